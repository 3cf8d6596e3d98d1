"""The per-element update of every algorithm, written once.

Each rule is a plain function of float32 scalars: the parameter ``p``, its gradient
``g``, the algorithm's state values, and ``h``, the float32 hyperparameters that the
optimizer computed on the host for this step (bias corrections, decayed learning rates
...). ``h`` is a named tuple whose type is declared next to the rule and named by the
rule's annotation; the host builds it by field name (with the type's ``of``, see
:func:`scalars`) and the rule reads it by field name, so no one counts positions. It
returns the new parameter followed by the new state values, in the order it received
them.

The host fills ``h`` with numbers (Python floats, bools for flags), and the backends
round every field to float32 at once as they launch (``_template.float32s``: one array
on the CPU, a tuple passed by value on CUDA); the kernels turn it back into the named
type before their loops. A flag arrives as 1.0 or 0.0, which ``if h.flag`` reads as
it reads a bool.

The same function is compiled for the CPU (``kernels.cpu``) and for CUDA
(``kernels.cuda``). A rule may be called with some of its state absent: the driver
then passes 0 for it and drops the returned value, and the rule's flags in ``h`` make
sure an absent value never reaches ``p``.

A rule may return more: :func:`returns` names its results, and the names that are not
buffers are float64 terms that a pass can sum per segment (a tensor, a row, the whole
buffer), for the algorithms that take several passes. Each pass uses the results it
needs (see ``kernels._template.Pass``), and the compiler drops the work of the others.

``caution`` (Adam, Lion, Adan) is the Cautious Optimizers mask (Liang et al. 2024), as
timm computes it: the momentum steps only where it agrees in sign with the gradient
(elsewhere it is multiplied by 0, which keeps a NaN), scaled by ``caution_scale``, 1 /
max(the share of the tensor that agrees, 1e-3) in float32. That share needs a pass of
its own first, which sums the rule's ``agreement`` per tensor.

Python float literals are float64 and would promote the whole expression, so every
constant, including ``1 - beta``, arrives through ``h`` as a float32.

A rule receives the gradient already prepared by :func:`prepare`, which the drivers
call first with the optimizer's ``prep`` (numbers in the order of ``Prep``'s fields,
which ``fastopt.optim.engine.prep`` alone builds, rounded to float32 like ``h``): the
sign for ``maximize``, loss-scale and clipping factors, value clipping and torch's L2
weight decay are the same for every algorithm, so they are written once, there.

``max`` would drop a NaN where torch.maximum keeps it, hence the explicit selects. A
moving average of squares multiplies ``(1 - beta) * g * g`` from the left, as torch's
addcmul does, so that it overflows float32 exactly where torch's does.
"""

import math
import types
from collections import namedtuple

from numpy import float32, float64


def returns(*names):
    """Declare what a rule returns, by name, where that is more than its new ``p`` and
    state values in order: a buffer's name stands for its new value, any other name for
    a float64 term that a pass may sum (most are ``float64(x) * float64(y)``: exact, and
    never overflowing)."""
    def declare(rule):
        rule.returns = names
        return rule
    return declare


def scalars(typename, fields):
    """The named tuple type of a rule's ``h``, whose ``of`` builds one by field name.

    The host builds an ``h`` at every step, and calling a class passes keywords through
    a dict: ``AdamScalars(decay=..., ...)`` takes 0.6 µs, a fifth of a step of 1e3
    parameters, and ``AdamScalars.of(decay=..., ...)``, a plain function, 0.25 µs. It is
    written out as source, as ``namedtuple`` writes its ``__new__``."""
    cls = namedtuple(typename, fields)
    keywords = "".join(f", {name}" for name in cls._fields)
    values = "".join(f"{name}, " for name in cls._fields)
    of = f"lambda *{keywords}: new(cls, ({values}))" if values else "lambda: new(cls, ())"
    of = eval(of, {"new": tuple.__new__, "cls": cls})
    of.__qualname__ = f"{typename}.of"  # for the message of a missing field
    cls.of = staticmethod(of)
    return cls


HALF, ONE = float32(0.5), float32(1.0)  # constants of the compiled code, as float32


def lerp(start, end, weight):
    """torch's ``start.lerp_(end, weight)``, the moving averages' update: from ``start``
    for a weight below 0.5, else from ``end``, which a weight of 1 (beta1 = 0) gives
    exactly, where ``start + weight * (end - start)`` loses it beside a large start."""
    diff = end - start
    if weight < HALF:
        return start + weight * diff
    return end - diff * (ONE - weight)


# The functions the rules call, which each backend compiles as it compiles the rules.
HELPERS = (lerp,)


def calling(rule, helpers):
    """``rule`` calling ``helpers``, a backend's compiled :data:`HELPERS` by name, in
    their place."""
    return types.FunctionType(rule.__code__, {**rule.__globals__, **helpers}, rule.__name__,
                              rule.__defaults__, rule.__closure__)


# The factors of prepare(), which every algorithm shares.
Prep = namedtuple("Prep", "g_scale g_downscale clip weight_decay")


def prepare(p, g, prep):
    """The gradient a rule sees: scaled, clipped to [-clip, clip], plus L2 decay.

    ``g_scale`` folds the sign for ``maximize``, the inverse loss scale and the
    gradient-norm clipping coefficient into one factor (with ``g_downscale``, where it
    is too small for a normal float32). ``clip`` is +inf when value
    clipping is off, and a NaN passes through the comparisons as it does through
    torch's clamp. Like torch, a zero weight decay adds nothing, so that an infinite
    parameter does not turn g into NaN.
    """
    g_scale, g_downscale, clip, weight_decay = prep  # in the order of Prep's fields
    # g_downscale is 1, or 2**-126 where g_scale alone would be a subnormal float32
    # (a loss scale near 2**127, or one times a clipping coefficient), which the CPU
    # kernels, flushing subnormals, would read as 0: every gradient zeroed, silently.
    g = g * g_scale * g_downscale
    # Two selects, where an if/elif took seven vector operations: LLVM makes these a
    # maximum and a minimum, whose operand order lets a NaN through (clip > 0). Adam
    # took 0.86-0.98x its time in the caches (AMD Zen 3, one thread, 1e5).
    g = clip if g > clip else g
    g = -clip if g < -clip else g
    if weight_decay:
        g = g + weight_decay * p
    return g


SGDScalars = scalars("SGDScalars", "lr momentum grad_weight nesterov")


def sgd(p, g, momentum_buffer, h: SGDScalars):
    # grad_weight is 1 - dampening. With the buffer absent, momentum = 0 and
    # grad_weight = 1 make this plain SGD; on the buffer's first step grad_weight = 1
    # too, so it takes the raw gradient as torch's does.
    momentum_buffer = h.momentum * momentum_buffer + h.grad_weight * g
    if h.nesterov:
        direction = g + h.momentum * momentum_buffer
    else:
        direction = momentum_buffer
    return p - h.lr * direction, momentum_buffer


AdagradScalars = scalars("AdagradScalars", "clr eps")


def adagrad(p, g, sum, h: AdagradScalars):  # "sum" is torch's name for the accumulator
    sum = sum + g * g
    return p - h.clr * (g / (math.sqrt(sum) + h.eps)), sum


RMSpropScalars = scalars("RMSpropScalars", ["lr", "alpha", "one_minus_alpha", "eps",
                                               "momentum", "centered"])


def rmsprop(p, g, square_avg, grad_avg, momentum_buffer, h: RMSpropScalars):
    square_avg = h.alpha * square_avg + h.one_minus_alpha * g * g
    if h.centered:
        grad_avg = lerp(grad_avg, g, h.one_minus_alpha)
        variance = square_avg - grad_avg * grad_avg
        # torch fuses this multiply-add, so a finite grad_avg whose square overflows
        # leaves an infinite square_avg infinite there; unfused, inf - inf is NaN.
        if variance != variance and math.isfinite(grad_avg):
            variance = square_avg
        avg = math.sqrt(variance) + h.eps
    else:
        avg = math.sqrt(square_avg) + h.eps
    # Without a momentum buffer, momentum = 0 and this is torch's p -= lr * g / avg.
    momentum_buffer = h.momentum * momentum_buffer + g / avg
    return p - h.lr * momentum_buffer, square_avg, grad_avg, momentum_buffer


AdadeltaScalars = scalars("AdadeltaScalars", "lr rho one_minus_rho eps")


def adadelta(p, g, square_avg, acc_delta, h: AdadeltaScalars):
    square_avg = h.rho * square_avg + h.one_minus_rho * g * g
    delta = math.sqrt(acc_delta + h.eps) / math.sqrt(square_avg + h.eps) * g
    acc_delta = h.rho * acc_delta + h.one_minus_rho * delta * delta
    return p - h.lr * delta, square_avg, acc_delta


AdamScalars = scalars("AdamScalars", ["decay", "step_size", "inv_bc2_sqrt", "eps",
                                         "one_minus_beta1", "beta2", "one_minus_beta2",
                                         "amsgrad", "caution", "caution_scale", "zero"])


@returns("p", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "agreement")
def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, h: AdamScalars):
    exp_avg = lerp(exp_avg, g, h.one_minus_beta1)
    exp_avg_sq = h.beta2 * exp_avg_sq + h.one_minus_beta2 * g * g
    if h.amsgrad:
        if exp_avg_sq > max_exp_avg_sq or exp_avg_sq != exp_avg_sq:
            max_exp_avg_sq = exp_avg_sq
        second = max_exp_avg_sq
    else:
        second = exp_avg_sq
    denom = math.sqrt(second) * h.inv_bc2_sqrt + h.eps
    agrees = exp_avg * g > h.zero  # caution: see the module docstring
    direction = exp_avg * (h.caution_scale if agrees else h.zero) if h.caution else exp_avg
    # decay is AdamW's 1 - lr * weight_decay, applied before the Adam step.
    return (p * h.decay - h.step_size * (direction / denom), exp_avg, exp_avg_sq,
            max_exp_avg_sq, float64(agrees))


AdamaxScalars = scalars("AdamaxScalars", "clr eps one_minus_beta1 beta2")


def adamax(p, g, exp_avg, exp_inf, h: AdamaxScalars):
    exp_avg = lerp(exp_avg, g, h.one_minus_beta1)
    exp_inf = h.beta2 * exp_inf
    bound = abs(g) + h.eps
    if bound > exp_inf or bound != bound:
        exp_inf = bound
    return p - h.clr * (exp_avg / exp_inf), exp_avg, exp_inf


NAdamScalars = scalars("NAdamScalars", ["decay", "grad_coef", "avg_coef", "inv_bc2",
                                           "eps", "one_minus_beta1", "beta2",
                                           "one_minus_beta2"])


def nadam(p, g, exp_avg, exp_avg_sq, h: NAdamScalars):
    exp_avg = lerp(exp_avg, g, h.one_minus_beta1)
    exp_avg_sq = h.beta2 * exp_avg_sq + h.one_minus_beta2 * g * g
    denom = math.sqrt(exp_avg_sq * h.inv_bc2) + h.eps
    # The Nesterov look-ahead: the gradient weighted by (1 - mu_t) / (1 - prod mu) and
    # the momentum by mu_(t+1) / (1 - prod mu * mu_(t+1)), both folded on the host.
    p = p * h.decay - h.grad_coef * (g / denom)
    return p - h.avg_coef * (exp_avg / denom), exp_avg, exp_avg_sq


RAdamScalars = scalars("RAdamScalars", ["decay", "step_size", "eps", "one_minus_beta1",
                                           "beta2", "one_minus_beta2", "rectified"])


def radam(p, g, exp_avg, exp_avg_sq, h: RAdamScalars):
    exp_avg = lerp(exp_avg, g, h.one_minus_beta1)
    exp_avg_sq = h.beta2 * exp_avg_sq + h.one_minus_beta2 * g * g
    # step_size folds lr, the bias corrections and the rectification term. While the
    # variance estimate is not yet trusted (rho_t <= 5) the step is plain momentum.
    if h.rectified:
        direction = exp_avg / (math.sqrt(exp_avg_sq) + h.eps)
    else:
        direction = exp_avg
    return p * h.decay - h.step_size * direction, exp_avg, exp_avg_sq


RpropScalars = scalars("RpropScalars", ["etaminus", "etaplus", "step_size_min",
                                           "step_size_max", "zero"])


def rprop(p, g, prev, step_size, h: RpropScalars):
    # torch.sign maps NaN to 0, so torch's Rprop passes over a NaN gradient, leaving
    # the step size and the parameter as they were; the comparisons below do the same.
    agreement = g * prev
    if agreement > h.zero:
        step_size = step_size * h.etaplus
    elif agreement < h.zero:
        # The sign flipped: the last step jumped over a minimum. Shrink the step and
        # skip this one, and forget g so that the next step counts as a fresh start.
        step_size = step_size * h.etaminus
        g = h.zero
    if step_size < h.step_size_min:
        step_size = h.step_size_min
    elif step_size > h.step_size_max:
        step_size = h.step_size_max
    if g > h.zero:
        p = p - step_size
    elif g < h.zero:
        p = p + step_size
    return p, g, step_size


ASGDScalars = scalars("ASGDScalars", "decay eta mu averaging")


def asgd(p, g, ax, h: ASGDScalars):
    p = p * h.decay - h.eta * g
    # Until t0 steps have passed (mu = 1) the average is the last iterate.
    if h.averaging:
        ax = ax + h.mu * (p - ax)
    else:
        ax = p
    return p, ax


AdanScalars = scalars("AdanScalars", ["decay", "step_size", "step_size_diff", "bc3_sqrt",
                                         "eps", "one_minus_beta1", "beta2", "one_minus_beta2",
                                         "beta3", "one_minus_beta3", "prox", "has_prev_grad",
                                         "caution", "caution_scale", "zero"])


@returns("p", "exp_avg", "exp_avg_sq", "exp_avg_diff", "prev_grad", "agreement")
def adan(p, g, exp_avg, exp_avg_sq, exp_avg_diff, prev_grad, h: AdanScalars):
    # As timm's Adan, operation for operation (a lerp for m, multiply-adds for d and n,
    # divisions where it divides). On the first step there is no previous gradient and
    # the difference is g - g (NaN for an infinite g, as there).
    diff = g - prev_grad if h.has_prev_grad else g - g
    exp_avg = lerp(exp_avg, g, h.one_minus_beta1)
    exp_avg_diff = h.beta2 * exp_avg_diff + h.one_minus_beta2 * diff
    update = diff * h.beta2 + g
    exp_avg_sq = h.beta3 * exp_avg_sq + h.one_minus_beta3 * update * update
    denom = math.sqrt(exp_avg_sq) / h.bc3_sqrt + h.eps
    # decay is 1 - lr * weight_decay with no_prox (else 1), prox 1 + lr * weight_decay
    # without it (else 1): multiplying or dividing by 1 leaves p as it is.
    agrees = exp_avg * g > h.zero  # caution: see the module docstring
    direction = exp_avg * (h.caution_scale if agrees else h.zero) if h.caution else exp_avg
    p = p * h.decay - h.step_size * (direction / denom)
    p = (p - h.step_size_diff * (exp_avg_diff / denom)) / h.prox
    return p, exp_avg, exp_avg_sq, exp_avg_diff, g, float64(agrees)


LionScalars = scalars("LionScalars", ["decay", "lr", "beta1", "one_minus_beta1", "beta2",
                                         "one_minus_beta2", "one", "caution", "caution_scale",
                                         "zero"])


@returns("p", "exp_avg", "agreement")
def lion(p, g, exp_avg, h: LionScalars):
    update = h.beta1 * exp_avg + h.one_minus_beta1 * g
    direction = update if update == -update or update != update else math.copysign(h.one, update)
    agrees = direction * g > h.zero  # caution: see the module docstring
    if h.caution:
        direction = direction * (h.caution_scale if agrees else h.zero)
    return (p * h.decay - h.lr * direction, h.beta2 * exp_avg + h.one_minus_beta2 * g,
            float64(agrees))


LAMBScalars = scalars("LAMBScalars", ["trust_lr", "trust_scale", "weight_decay", "inv_bc1",
                                         "inv_bc2_sqrt", "eps", "one_minus_beta1", "beta2",
                                         "one_minus_beta2", "moving"])


@returns("p", "exp_avg", "exp_avg_sq", "param_sq", "update_sq")
def lamb(p, g, exp_avg, exp_avg_sq, h: LAMBScalars):
    """LAMB's moments and its direction u = r + wd * p, where the step is
    ``p - trust_lr * u`` and ``trust_lr`` depends on the norms of p and u over the whole
    tensor. So LAMB takes two passes: the first moves the moments (``moving``) and
    sums ``param_sq`` and ``update_sq`` per tensor, the second recomputes u from them
    and steps with each tensor's ``trust_lr`` times ``trust_scale``, a power of two that
    is 1 but where their product lies beyond float32's range (see
    ``fastopt.optim.layerwise.in_float32_range``)."""
    if h.moving:
        exp_avg = lerp(exp_avg, g, h.one_minus_beta1)
        exp_avg_sq = h.beta2 * exp_avg_sq + h.one_minus_beta2 * g * g
    ratio = (exp_avg * h.inv_bc1) / (math.sqrt(exp_avg_sq) * h.inv_bc2_sqrt + h.eps)
    update = ratio + h.weight_decay * p
    step = h.trust_lr * (update * h.trust_scale)
    return (p - step, exp_avg, exp_avg_sq, float64(p) * float64(p),
            float64(update) * float64(update))


LARSScalars = scalars("LARSScalars", "trust_lr trust_scale momentum weight_decay")


def lars(p, g, momentum_buffer, h: LARSScalars):
    """LARS's step, with ``trust_lr`` times ``trust_scale`` the lr times the tensor's
    local learning rate, which a first pass of :func:`norms` measures (split as LAMB's)."""
    momentum_buffer = (h.momentum * momentum_buffer
                       + h.trust_lr * ((g + h.weight_decay * p) * h.trust_scale))
    return p - momentum_buffer, momentum_buffer


AdafactorScalars = scalars("AdafactorScalars", ["beta", "eps1_sq", "moving", "row_scale",
                                                   "decay", "step_size"])


@returns("p", "second", "update_sq")
def adafactor(p, g, second, h: AdafactorScalars):
    """Adafactor's step ``p * decay - step_size * u``, with the direction
    ``u = g / sqrt(max(estimate, eps1**2))``.

    ``second`` is a vector's own second moment, which lerps toward g*g when
    ``moving``, and is its estimate; or a factored row's column factor, which is never
    moved here and which ``row_scale`` (the row's factor over their mean) makes the
    estimate. Also returns the term of RMS(u) (u*u computed without the square root),
    for the pass that sums it: ``step_size`` depends on that sum over the tensor."""
    if h.moving:
        second = lerp(second, g * g, h.beta)
    estimate = h.row_scale * second
    # torch clamps, which keeps a NaN.
    if estimate < h.eps1_sq:
        estimate = h.eps1_sq
    update = g / math.sqrt(estimate)
    return p * h.decay - h.step_size * update, second, float64(g * g / estimate)


SWATSAdamScalars = scalars("SWATSAdamScalars", ["coef", "eps", "one_minus_beta1",
                                                   "beta2", "one_minus_beta2"])


@returns("p", "exp_avg", "exp_avg_sq", "direction_sq", "direction_g")
def swats_adam(p, g, exp_avg, exp_avg_sq, h: SWATSAdamScalars):
    """SWATS's Adam phase. Also returns the terms of d.d and d.g, where the step is
    -coef * d, for the switching test."""
    exp_avg = lerp(exp_avg, g, h.one_minus_beta1)
    exp_avg_sq = h.beta2 * exp_avg_sq + h.one_minus_beta2 * g * g
    # eps is added to the uncorrected sqrt: the paper folds both corrections into coef.
    direction = exp_avg / (math.sqrt(exp_avg_sq) + h.eps)
    return (p - h.coef * direction, exp_avg, exp_avg_sq, float64(direction) * float64(direction),
            float64(direction) * float64(g))


EMAScalars = scalars("EMAScalars", "one_minus_decay")


@returns("average")
def ema(average, value, h: EMAScalars):
    """An exponential moving average, as torch's ``average.lerp_(value, 1 - decay)``.
    Not ``decay * average + (1 - decay) * value``: its two roundings of a slowly moving
    average err the same way update after update, some ``2**-24 / (1 - decay)`` of it
    (5.6e-4 on averages of 3 after 20,000 updates at 0.9999, against 1e-5 so)."""
    return lerp(average, value, h.one_minus_decay)


NoScalars = scalars("NoScalars", "")


@returns("param_sq", "grad_sq")
def norms(p, g, h: NoScalars):
    """The terms of the squared norms of p and of the prepared gradient."""
    return float64(p) * float64(p), float64(g) * float64(g)


@returns("grad_sq")
def grad_squares(g, h: NoScalars):
    """The terms of the squared norm of the gradient as it is (a rule without ``p``
    sees it unprepared): the global norm that clipping and skipping measure."""
    return float64(g) * float64(g)
