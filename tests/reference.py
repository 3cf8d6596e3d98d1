"""float64 reference implementations, written from the published formulas.

These are the oracle of the test suite. They share no code with ``kernels/``, keep
their state in float64 and follow torch.optim's ``_single_tensor_*`` definitions
(where eps goes, the first momentum step, decoupled decay ...). Each ``step`` takes
the parameters and a gradient as float64 arrays and returns the new parameters.
"""

import math

import numpy as np


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
                 bias_correction=True):
        super().__init__(n, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize,
                         decoupled_weight_decay=decoupled_weight_decay,
                         bias_correction=bias_correction)
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
        if h["bias_correction"]:
            m_hat = self.m / (1 - b1 ** t)
            denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + h["eps"]
        else:
            m_hat, denom = self.m, np.sqrt(v) + h["eps"]
        return p - h["lr"] * m_hat / denom


class AdamW(Adam):
    def __init__(self, n, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, bias_correction=True):
        super().__init__(n, lr, betas, eps, weight_decay, amsgrad, maximize, True,
                         bias_correction)


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
