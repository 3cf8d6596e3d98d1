"""The per-element update of every algorithm, written once.

Each rule is a plain function of float32 scalars: the parameter ``p``, its gradient
``g``, the algorithm's state values, and ``h``, a tuple of float32 hyperparameters that
the optimizer computed on the host for this step (bias corrections, decayed learning
rates ...). It returns the new parameter followed by the new state values, in the order
it received them.

The same function is compiled for the CPU (``kernels.cpu``) and for CUDA
(``kernels.cuda``). A rule may be called with some of its state absent: the driver
then passes 0 for it and drops the returned value, and the rule's flags in ``h`` make
sure an absent value never reaches ``p``.

The rules of algorithms that take several passes (``lamb``, ``adafactor``,
``swats_adam``) return what their drivers need instead; their docstrings say what.

Python float literals are float64 and would promote the whole expression, so every
constant, including ``1 - beta``, arrives through ``h`` as a float32.

A rule receives the gradient already prepared by :func:`prepare`, which the drivers
call first with the optimizer's ``prep`` tuple: the sign for ``maximize``, loss-scale
and clipping factors, value clipping and torch's L2 weight decay are the same for
every algorithm, so they are written once, there.

``max`` would drop a NaN where torch.maximum keeps it, hence the explicit selects. A
moving average of squares multiplies ``(1 - beta) * g * g`` from the left, as torch's
addcmul does, so that it overflows float32 exactly where torch's does.
"""

import math


def prepare(p, g, prep):
    """The gradient a rule sees: scaled, clipped to [-clip, clip], plus L2 decay.

    ``g_scale`` folds the sign for ``maximize``, the inverse loss scale and the
    gradient-norm clipping coefficient into one factor. ``clip`` is +inf when value
    clipping is off, and a NaN passes through the comparisons as it does through
    torch's clamp. Like torch, a zero weight decay adds nothing, so that an infinite
    parameter does not turn g into NaN.
    """
    g_scale, clip, weight_decay = prep
    g = g * g_scale
    if g > clip:
        g = clip
    elif g < -clip:
        g = -clip
    if weight_decay:
        g = g + weight_decay * p
    return g


def sgd(p, g, momentum_buffer, h):
    lr, momentum, grad_weight, nesterov = h
    # grad_weight is 1 - dampening. With the buffer absent, momentum = 0 and
    # grad_weight = 1 make this plain SGD; on the buffer's first step grad_weight = 1
    # too, so it takes the raw gradient as torch's does.
    momentum_buffer = momentum * momentum_buffer + grad_weight * g
    if nesterov:
        direction = g + momentum * momentum_buffer
    else:
        direction = momentum_buffer
    return p - lr * direction, momentum_buffer


def adagrad(p, g, sum, h):  # "sum" is torch's name for the accumulator
    clr, eps = h
    sum = sum + g * g
    return p - clr * (g / (math.sqrt(sum) + eps)), sum


def rmsprop(p, g, square_avg, grad_avg, momentum_buffer, h):
    lr, alpha, one_minus_alpha, eps, momentum, centered = h
    square_avg = alpha * square_avg + one_minus_alpha * g * g
    if centered:
        grad_avg = grad_avg + one_minus_alpha * (g - grad_avg)
        variance = square_avg - grad_avg * grad_avg
        # torch fuses this multiply-add, so a finite grad_avg whose square overflows
        # leaves an infinite square_avg infinite there; unfused, inf - inf is NaN.
        if variance != variance and math.isfinite(grad_avg):
            variance = square_avg
        avg = math.sqrt(variance) + eps
    else:
        avg = math.sqrt(square_avg) + eps
    # Without a momentum buffer, momentum = 0 and this is torch's p -= lr * g / avg.
    momentum_buffer = momentum * momentum_buffer + g / avg
    return p - lr * momentum_buffer, square_avg, grad_avg, momentum_buffer


def adadelta(p, g, square_avg, acc_delta, h):
    lr, rho, one_minus_rho, eps = h
    square_avg = rho * square_avg + one_minus_rho * g * g
    delta = math.sqrt(acc_delta + eps) / math.sqrt(square_avg + eps) * g
    acc_delta = rho * acc_delta + one_minus_rho * delta * delta
    return p - lr * delta, square_avg, acc_delta


def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, h):
    (decay, step_size, inv_bc2_sqrt, eps,
     one_minus_beta1, beta2, one_minus_beta2, amsgrad) = h
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    if amsgrad:
        if exp_avg_sq > max_exp_avg_sq or exp_avg_sq != exp_avg_sq:
            max_exp_avg_sq = exp_avg_sq
        second = max_exp_avg_sq
    else:
        second = exp_avg_sq
    denom = math.sqrt(second) * inv_bc2_sqrt + eps
    # decay is AdamW's 1 - lr * weight_decay, applied before the Adam step.
    return p * decay - step_size * (exp_avg / denom), exp_avg, exp_avg_sq, max_exp_avg_sq


def adamax(p, g, exp_avg, exp_inf, h):
    clr, eps, one_minus_beta1, beta2 = h
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_inf = beta2 * exp_inf
    bound = abs(g) + eps
    if bound > exp_inf or bound != bound:
        exp_inf = bound
    return p - clr * (exp_avg / exp_inf), exp_avg, exp_inf


def nadam(p, g, exp_avg, exp_avg_sq, h):
    (decay, grad_coef, avg_coef, inv_bc2, eps,
     one_minus_beta1, beta2, one_minus_beta2) = h
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    denom = math.sqrt(exp_avg_sq * inv_bc2) + eps
    # The Nesterov look-ahead: the gradient weighted by (1 - mu_t) / (1 - prod mu) and
    # the momentum by mu_(t+1) / (1 - prod mu * mu_(t+1)), both folded on the host.
    p = p * decay - grad_coef * (g / denom)
    return p - avg_coef * (exp_avg / denom), exp_avg, exp_avg_sq


def radam(p, g, exp_avg, exp_avg_sq, h):
    (decay, step_size, eps, one_minus_beta1, beta2, one_minus_beta2, rectified) = h
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    # step_size folds lr, the bias corrections and the rectification term. While the
    # variance estimate is not yet trusted (rho_t <= 5) the step is plain momentum.
    if rectified:
        direction = exp_avg / (math.sqrt(exp_avg_sq) + eps)
    else:
        direction = exp_avg
    return p * decay - step_size * direction, exp_avg, exp_avg_sq


def rprop(p, g, prev, step_size, h):
    etaminus, etaplus, step_size_min, step_size_max, zero = h
    # torch.sign maps NaN to 0, so torch's Rprop passes over a NaN gradient, leaving
    # the step size and the parameter as they were; the comparisons below do the same.
    agreement = g * prev
    if agreement > zero:
        step_size = step_size * etaplus
    elif agreement < zero:
        # The sign flipped: the last step jumped over a minimum. Shrink the step and
        # skip this one, and forget g so that the next step counts as a fresh start.
        step_size = step_size * etaminus
        g = zero
    if step_size < step_size_min:
        step_size = step_size_min
    elif step_size > step_size_max:
        step_size = step_size_max
    if g > zero:
        p = p - step_size
    elif g < zero:
        p = p + step_size
    return p, g, step_size


def asgd(p, g, ax, h):
    decay, eta, mu, averaging = h
    p = p * decay - eta * g
    # Until t0 steps have passed (mu = 1) the average is the last iterate.
    if averaging:
        ax = ax + mu * (p - ax)
    else:
        ax = p
    return p, ax


def lion(p, g, exp_avg, h):
    decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, one = h
    update = beta1 * exp_avg + one_minus_beta1 * g
    direction = update if update == -update or update != update else math.copysign(one, update)
    return p * decay - lr * direction, beta2 * exp_avg + one_minus_beta2 * g


def lamb(p, g, exp_avg, exp_avg_sq, h):
    """LAMB's moments and its direction u = r + wd * p, where the step is
    ``p - trust_lr * u`` and ``trust_lr`` depends on the norms of p and u over the whole
    tensor. So LAMB takes two passes: the first moves the moments (``moving``) and
    sums the norms, the second recomputes u from them and steps."""
    weight_decay, inv_bc1, inv_bc2_sqrt, eps, one_minus_beta1, beta2, one_minus_beta2, moving = h
    if moving:
        exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
        exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    ratio = (exp_avg * inv_bc1) / (math.sqrt(exp_avg_sq) * inv_bc2_sqrt + eps)
    return exp_avg, exp_avg_sq, ratio + weight_decay * p


def lars(p, g, momentum_buffer, h):
    """LARS's step, with ``trust_lr`` the lr times the tensor's local learning rate."""
    trust_lr, momentum, weight_decay = h
    momentum_buffer = momentum * momentum_buffer + trust_lr * (g + weight_decay * p)
    return p - momentum_buffer, momentum_buffer


def adafactor(g, second, h):
    """Adafactor's direction ``u = g / sqrt(max(estimate, eps1**2))``.

    ``second`` is a vector's own second moment, which lerps toward g*g when
    ``moving``, or a factored tensor's estimate ``row_var * col_var / row_mean``, which
    the caller forms and never moves here. Returns the second moment, u, and u*u
    computed without the square root, for the pass that only needs the norm of u."""
    beta, eps1_sq, moving = h
    if moving:
        second = second + beta * (g * g - second)
    # torch clamps, which keeps a NaN.
    estimate = eps1_sq if second < eps1_sq else second
    return second, g / math.sqrt(estimate), g * g / estimate


def swats_adam(p, g, exp_avg, exp_avg_sq, h):
    """SWATS's Adam phase. Also returns the direction d, where the step is -coef * d,
    so that the driver can reduce d.d and d.g for the switching test."""
    coef, eps, one_minus_beta1, beta2, one_minus_beta2 = h
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    # eps is added to the uncorrected sqrt: the paper folds both corrections into coef.
    direction = exp_avg / (math.sqrt(exp_avg_sq) + eps)
    return p - coef * direction, exp_avg, exp_avg_sq, direction


def ema(average, value, h):
    """An exponential moving average: ``decay * average + (1 - decay) * value``."""
    decay, one_minus_decay = h
    return decay * average + one_minus_decay * value
