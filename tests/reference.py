"""float64 reference implementations, written from the published formulas.

These are the oracle of the test suite. They share no code with ``kernels/``, keep
their state in float64 and follow torch.optim's ``_single_tensor_*`` definitions
(where eps goes, the first momentum step, decoupled decay ...). Each ``step`` takes
the parameters and a gradient as float64 arrays and returns the new parameters.
"""

import math

import numpy as np


def cautious(direction, g):
    """The Cautious Optimizers mask (Liang et al. 2024, "Cautious Optimizers: Improving
    Training with One Line of Code", arXiv:2411.16085): ``direction`` where it agrees in
    sign with ``g``, 0 elsewhere, scaled by 1 / max(the share that agrees, 1e-3) as timm
    does, over the whole array (one tensor)."""
    agree = direction * g > 0
    share = agree.mean() if agree.size else 1.0
    return np.where(agree, direction / max(share, 1e-3), 0.0)


class Reference:
    def __init__(self, n, **hyper):
        self.h = hyper
        self.t = 0
        self.n = n

    def gradient(self, p, g):
        g = -g if self.h.get("maximize", False) else g
        return g + self.h.get("weight_decay", 0.0) * p if not self.decoupled() else g

    def decoupled(self):
        return self.h.get("decoupled_weight_decay", False)


class SGD(Reference):
    def __init__(self, n, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False):
        super().__init__(n, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        self.buf = None

    def step(self, p, g):
        h = self.h
        g = self.gradient(p, g)
        if h["momentum"] != 0:
            if self.buf is None:
                self.buf = g.copy()
            else:
                self.buf = h["momentum"] * self.buf + (1 - h["dampening"]) * g
            g = g + h["momentum"] * self.buf if h["nesterov"] else self.buf
        return p - h["lr"] * g


class Adagrad(Reference):
    def __init__(self, n, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, maximize=False):
        super().__init__(n, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                         maximize=maximize)
        self.sum = np.full(n, float(initial_accumulator_value))

    def step(self, p, g):
        self.t += 1
        h = self.h
        g = self.gradient(p, g)
        clr = h["lr"] / (1 + (self.t - 1) * h["lr_decay"])
        self.sum = self.sum + g * g
        return p - clr * g / (np.sqrt(self.sum) + h["eps"])


class RMSprop(Reference):
    def __init__(self, n, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, maximize=False):
        super().__init__(n, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered, maximize=maximize)
        self.sq = np.zeros(n)
        self.avg = np.zeros(n)
        self.buf = np.zeros(n)

    def step(self, p, g):
        h = self.h
        g = self.gradient(p, g)
        a = h["alpha"]
        self.sq = a * self.sq + (1 - a) * g * g
        if h["centered"]:
            self.avg = a * self.avg + (1 - a) * g
            denom = np.sqrt(self.sq - self.avg ** 2) + h["eps"]
        else:
            denom = np.sqrt(self.sq) + h["eps"]
        if h["momentum"] > 0:
            self.buf = h["momentum"] * self.buf + g / denom
            return p - h["lr"] * self.buf
        return p - h["lr"] * g / denom


class Adadelta(Reference):
    def __init__(self, n, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False):
        super().__init__(n, lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                         maximize=maximize)
        self.sq = np.zeros(n)
        self.acc = np.zeros(n)

    def step(self, p, g):
        h = self.h
        g = self.gradient(p, g)
        rho, eps = h["rho"], h["eps"]
        self.sq = rho * self.sq + (1 - rho) * g * g
        delta = np.sqrt(self.acc + eps) / np.sqrt(self.sq + eps) * g
        self.acc = rho * self.acc + (1 - rho) * delta * delta
        return p - h["lr"] * delta


class Adam(Reference):
    def __init__(self, n, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled_weight_decay=False,
                 bias_correction=True, caution=False):
        super().__init__(n, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize,
                         decoupled_weight_decay=decoupled_weight_decay,
                         bias_correction=bias_correction, caution=caution)
        self.m = np.zeros(n)
        self.v = np.zeros(n)
        self.vmax = np.zeros(n)

    def step(self, p, g):
        self.t += 1
        h, t = self.h, self.t
        b1, b2 = h["betas"]
        g = self.gradient(p, g)
        if self.decoupled():
            p = p * (1 - h["lr"] * h["weight_decay"])
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        v = self.v
        if h["amsgrad"]:
            self.vmax = np.maximum(self.vmax, self.v)
            v = self.vmax
        m = cautious(self.m, g) if h["caution"] else self.m
        if h["bias_correction"]:
            m_hat = m / (1 - b1 ** t)
            denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + h["eps"]
        else:
            m_hat, denom = m, np.sqrt(v) + h["eps"]
        return p - h["lr"] * m_hat / denom


class AdamW(Adam):
    def __init__(self, n, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, bias_correction=True, caution=False):
        super().__init__(n, lr, betas, eps, weight_decay, amsgrad, maximize, True,
                         bias_correction, caution)


class Adamax(Reference):
    def __init__(self, n, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 maximize=False):
        super().__init__(n, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         maximize=maximize)
        self.m = np.zeros(n)
        self.u = np.zeros(n)

    def step(self, p, g):
        self.t += 1
        h = self.h
        b1, b2 = h["betas"]
        g = self.gradient(p, g)
        self.m = b1 * self.m + (1 - b1) * g
        self.u = np.maximum(b2 * self.u, np.abs(g) + h["eps"])
        return p - h["lr"] / (1 - b1 ** self.t) * self.m / self.u


class NAdam(Reference):
    def __init__(self, n, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False):
        super().__init__(n, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         momentum_decay=momentum_decay,
                         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        self.m = np.zeros(n)
        self.v = np.zeros(n)
        self.product = 1.0  # of mu_1 .. mu_t

    def mu(self, t):
        b1, _ = self.h["betas"]
        return b1 * (1 - 0.5 * 0.96 ** (t * self.h["momentum_decay"]))

    def step(self, p, g):
        self.t += 1
        h, t = self.h, self.t
        b1, b2 = h["betas"]
        g = self.gradient(p, g)
        if self.decoupled():
            p = p * (1 - h["lr"] * h["weight_decay"])
        mu, mu_next = self.mu(t), self.mu(t + 1)
        self.product *= mu
        product = self.product
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        denom = np.sqrt(self.v / (1 - b2 ** t)) + h["eps"]
        return (p - h["lr"] * (1 - mu) / (1 - product) * g / denom
                - h["lr"] * mu_next / (1 - product * mu_next) * self.m / denom)


class SWATS(Reference):
    """Algorithm 1 of Keskar & Socher (2017), "Improving Generalization Performance by
    Switching from Adam to SGD", for one parameter vector."""

    def __init__(self, n, lr=1e-3, betas=(0.9, 0.999), eps=1e-9, weight_decay=0.0,
                 maximize=False):
        super().__init__(n, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         maximize=maximize)
        self.m = np.zeros(n)
        self.a = np.zeros(n)
        self.lam = 0.0
        self.sgd_lr = None  # Λ once switched
        self.switch_step = None
        self.v = None

    def step(self, p, g):
        self.t += 1
        k, (beta1, beta2), eps = self.t, self.h["betas"], self.h["eps"]
        g = self.gradient(p, g)
        if self.sgd_lr is not None:
            self.v = beta1 * self.v + g
            return p - (1 - beta1) * self.sgd_lr * self.v
        self.m = beta1 * self.m + (1 - beta1) * g
        self.a = beta2 * self.a + (1 - beta2) * g * g
        step = (-self.h["lr"] * math.sqrt(1 - beta2 ** k) / (1 - beta1 ** k)
                * self.m / (np.sqrt(self.a) + eps))
        if step @ g != 0:
            gamma = (step @ step) / -(step @ g)
            self.lam = beta2 * self.lam + (1 - beta2) * gamma
            if k > 1 and abs(self.lam / (1 - beta2 ** k) - gamma) < eps:
                self.sgd_lr = self.lam / (1 - beta2 ** k)
                self.switch_step = k
                self.v = np.zeros_like(p)
        return p + step


class RAdam(Reference):
    """torch.optim.RAdam (``_single_tensor_radam``)."""

    def __init__(self, n, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, maximize=False):
        super().__init__(n, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        self.m = np.zeros(n)
        self.v = np.zeros(n)

    def step(self, p, g):
        self.t += 1
        h, t = self.h, self.t
        b1, b2 = h["betas"]
        g = self.gradient(p, g)
        if self.decoupled():
            p = p * (1 - h["lr"] * h["weight_decay"])
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        m_hat = self.m / (1 - b1 ** t)
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
        if rho_t > 5:
            rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                             / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            adaptive = math.sqrt(1 - b2 ** t) / (np.sqrt(self.v) + h["eps"])
            return p - h["lr"] * m_hat * rect * adaptive
        return p - h["lr"] * m_hat


class Rprop(Reference):
    """torch.optim.Rprop (``_single_tensor_rprop``)."""

    def __init__(self, n, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), maximize=False):
        super().__init__(n, lr=lr, etas=etas, step_sizes=step_sizes, maximize=maximize)
        self.prev = np.zeros(n)
        self.step_size = None  # filled with lr at the first step

    def step(self, p, g):
        self.t += 1
        h = self.h
        etaminus, etaplus = h["etas"]
        lo, hi = h["step_sizes"]
        g = self.gradient(p, g)
        if self.step_size is None:
            self.step_size = np.full(self.n, float(h["lr"]))
        s = np.sign(g * self.prev)
        factor = np.where(s > 0, etaplus, np.where(s < 0, etaminus, 1.0))
        self.step_size = np.clip(self.step_size * factor, lo, hi)
        g = np.where(s < 0, 0.0, g)
        self.prev = g
        return p - np.sign(g) * self.step_size


class ASGD(Reference):
    """torch.optim.ASGD (``_single_tensor_asgd``); ``ax`` is the averaged parameters."""

    def __init__(self, n, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0,
                 maximize=False):
        super().__init__(n, lr=lr, lambd=lambd, alpha=alpha, t0=t0,
                         weight_decay=weight_decay, maximize=maximize)
        self.eta = float(lr)
        self.mu = 1.0
        self.ax = np.zeros(n)

    def step(self, p, g):
        self.t += 1
        h, t = self.h, self.t
        g = self.gradient(p, g)
        p = p * (1 - h["lambd"] * self.eta) - self.eta * g
        if self.mu == 1:
            self.ax = p.copy()
        else:
            self.ax = self.ax + self.mu * (p - self.ax)
        self.eta = h["lr"] / (1 + h["lambd"] * h["lr"] * t) ** h["alpha"]
        self.mu = 1 / max(1, t - h["t0"])
        return p


class Lion(Reference):
    """Chen et al. (2023), "Symbolic Discovery of Optimization Algorithms", Algorithm 2."""

    def __init__(self, n, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, caution=False,
                 maximize=False):
        super().__init__(n, lr=lr, betas=betas, weight_decay=weight_decay, caution=caution,
                         maximize=maximize)
        self.m = np.zeros(n)

    def decoupled(self):
        return True

    def step(self, p, g):
        self.t += 1
        h = self.h
        b1, b2 = h["betas"]
        g = self.gradient(p, g)
        direction = np.sign(b1 * self.m + (1 - b1) * g)
        if h["caution"]:
            direction = cautious(direction, g)
        p = p * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * direction
        self.m = b2 * self.m + (1 - b2) * g
        return p


class Adan(Reference):
    """Xie et al. (2022), "Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models", Algorithm 1 with timm's conventions (the betas weigh the old
    moments; the weight decay is the proximal step, or decoupled with no_prox)."""

    def __init__(self, n, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0,
                 no_prox=False, caution=False, maximize=False):
        super().__init__(n, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         no_prox=no_prox, caution=caution, maximize=maximize)
        self.m, self.d, self.n_ = np.zeros(n), np.zeros(n), np.zeros(n)
        self.previous = None

    def decoupled(self):
        return True

    def step(self, p, g):
        self.t += 1
        h, t = self.h, self.t
        b1, b2, b3 = h["betas"]
        lr, wd = h["lr"], h["weight_decay"]
        g = self.gradient(p, g)
        diff = np.zeros_like(g) if self.previous is None else g - self.previous
        self.previous = g
        self.m = b1 * self.m + (1 - b1) * g
        self.d = b2 * self.d + (1 - b2) * diff
        self.n_ = b3 * self.n_ + (1 - b3) * (g + b2 * diff) ** 2
        denom = np.sqrt(self.n_ / (1 - b3 ** t)) + h["eps"]
        m = cautious(self.m, g) if h["caution"] else self.m
        update = lr / (1 - b1 ** t) * m / denom + lr * b2 / (1 - b2 ** t) * self.d / denom
        if h["no_prox"]:
            return p * (1 - lr * wd) - update
        return (p - update) / (1 + lr * wd)


class Layerwise(Reference):
    """Base of the per-tensor references: ``shapes`` lists the tensors' shapes and
    ``step`` takes their flat C-order concatenation, updating one tensor at a time."""

    def __init__(self, shapes, **hyper):
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        super().__init__(sum(self.sizes), **hyper)

    def decoupled(self):
        return True  # the weight decay is part of each algorithm's update, never L2 in g

    def split(self, x):
        out, start = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(x[start:start + size].reshape(shape))
            start += size
        return out

    def step(self, p, g):
        self.t += 1
        g = self.gradient(p, g)
        new = [np.ravel(self.update(i, pi, gi))
               for i, (pi, gi) in enumerate(zip(self.split(p), self.split(g)))]
        return np.concatenate(new) if new else np.zeros(0)


class LAMB(Layerwise):
    """You et al. (2019), "Large Batch Optimization for Deep Learning", Algorithm 2."""

    def __init__(self, shapes, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 maximize=False):
        super().__init__(shapes, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         maximize=maximize)
        self.m = [np.zeros(s) for s in self.shapes]
        self.v = [np.zeros(s) for s in self.shapes]

    def update(self, i, p, g):
        h, t = self.h, self.t
        b1, b2 = h["betas"]
        self.m[i] = b1 * self.m[i] + (1 - b1) * g
        self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
        r = (self.m[i] / (1 - b1 ** t)) / (np.sqrt(self.v[i] / (1 - b2 ** t)) + h["eps"])
        u = r + h["weight_decay"] * p
        p_norm, u_norm = np.linalg.norm(p), np.linalg.norm(u)
        trust = p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
        return p - h["lr"] * trust * u


class LARS(Layerwise):
    """You, Gitman & Ginsburg (2017), "Large Batch Training of Convolutional Networks",
    Algorithm 1."""

    def __init__(self, shapes, lr=1.0, momentum=0.9, weight_decay=0.0,
                 trust_coefficient=1e-3, maximize=False):
        super().__init__(shapes, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         trust_coefficient=trust_coefficient, maximize=maximize)
        self.v = [np.zeros(s) for s in self.shapes]

    def update(self, i, p, g):
        h = self.h
        wd = h["weight_decay"]
        p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
        if p_norm > 0 and g_norm > 0:
            local_lr = h["trust_coefficient"] * p_norm / (g_norm + wd * p_norm)
        else:
            local_lr = 1.0
        if h["momentum"] == 0:
            return p - h["lr"] * local_lr * (g + wd * p)
        self.v[i] = h["momentum"] * self.v[i] + h["lr"] * local_lr * (g + wd * p)
        return p - self.v[i]


class Adafactor(Layerwise):
    """torch.optim.Adafactor (``_single_tensor_adafactor``); eps1=None is float32's eps.
    ``state[i]`` holds row_var/col_var (>= 2 dims) or variance, in torch's shapes."""

    def __init__(self, shapes, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, maximize=False):
        super().__init__(shapes, lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                         weight_decay=weight_decay, maximize=maximize)
        self.state = []
        for s in self.shapes:
            if len(s) >= 2:
                self.state.append(dict(row_var=np.zeros(s[:-1] + (1,)),
                                       col_var=np.zeros(s[:-2] + (1,) + s[-1:])))
            else:
                self.state.append(dict(variance=np.zeros(s)))

    def update(self, i, p, g):
        if p.size == 0:
            return p  # torch divides by the size (0) here; nothing to update
        h, t, state = self.h, self.t, self.state[i]
        eps1, eps2 = h["eps"]
        eps1 = float(np.finfo(np.float32).eps) if eps1 is None else eps1
        beta = t ** h["beta2_decay"]
        rho = min(h["lr"], 1 / math.sqrt(t))
        alpha = max(eps2, math.sqrt(np.mean(p * p))) * rho
        p = p * (1 - h["lr"] * h["weight_decay"])
        if p.ndim >= 2:
            state["row_var"] = ((1 - beta) * state["row_var"]
                                + beta * np.mean(g * g, axis=-1, keepdims=True))
            state["col_var"] = ((1 - beta) * state["col_var"]
                                + beta * np.mean(g * g, axis=-2, keepdims=True))
            row_mean = np.mean(state["row_var"], axis=-2, keepdims=True)
            est = state["row_var"] * state["col_var"] / np.maximum(row_mean, eps1)
        else:
            state["variance"] = (1 - beta) * state["variance"] + beta * g * g
            est = state["variance"]
        u = g / np.sqrt(np.maximum(est, eps1 * eps1))
        denom = max(1.0, math.sqrt(np.mean(u * u)) / h["d"])
        return p - alpha / denom * u
