"""LAMB and LARS: a step scaled per parameter tensor by a trust ratio of norms."""

import math

import numpy as np
from numba import njit

from ..kernels import Pass, rules
from . import spec as hp
from .optimizer import Optimizer


class LayerWise(Optimizer):
    """The base of algorithms that scale each tensor's step by a ratio of norms over
    that tensor (a "layer"). The norms come from one parallel, deterministic segmented
    reduction whose segments are the tensors (see ``fastopt._backend.Segments``), fused
    with the pass that needs them."""

    @staticmethod
    def l2(group):
        return 0.0  # the weight decay is part of the layer-wise update


# The ratios of norms, per tensor, on the host in float64: compiled, as a handful of
# NumPy calls on arrays of one number per tensor cost several microseconds a step.

@njit(cache=True, error_model="numpy")
def lamb_trust_ratio(param_sq, update_sq):
    """Per tensor, ``‖p‖ / ‖u‖`` from the two sums of squares, or 1 where either norm
    is 0. A NaN or infinite norm carries through to the step, which it then spoils."""
    ratio = np.ones(param_sq.size)
    for k in range(param_sq.size):
        if param_sq[k] != 0 and update_sq[k] != 0:
            ratio[k] = np.sqrt(param_sq[k]) / np.sqrt(update_sq[k])
    return ratio


@njit(cache=True, error_model="numpy")
def in_float32_range(values):
    """``values`` (float64, per tensor) as two columns whose products they are, which
    the kernels take as float32: the values, and 1; but a value beyond float32's normal
    range, divided by a power of two, and that power. A tensor whose update (LAMB's
    moments after long zero gradients) or gradient (LARS's) is near 0 against its
    parameters has a trust ratio beyond float32 (1e39, an lr times it infinite: the step
    made the parameters -inf, then NaN), whose step the kernels then take exactly as
    ``trust_lr * (u * scale)``: ``u * scale`` scales a small u exactly."""
    scaled, scale = values.copy(), np.ones(values.size)
    for k in range(values.size):
        if values[k] == 0 or not math.isfinite(values[k]):
            continue
        exponent = math.frexp(values[k])[1]
        shift = (exponent - 127 if exponent > 127 else exponent + 125 if exponent < -125
                 else 0)
        shift = min(max(shift, -126), 127)  # the power of two itself a normal float32
        if shift:
            scaled[k], scale[k] = math.ldexp(values[k], -shift), math.ldexp(1.0, shift)
    return scaled, scale


@njit(cache=True, error_model="numpy")
def lars_local_lr(param_sq, grad_sq, coefficient, weight_decay):
    """Per tensor, ``η‖w‖ / (‖g‖ + β‖w‖)`` from the two sums of squares, or 1 where
    either norm is 0, as :func:`lamb_trust_ratio`."""
    local_lr = np.ones(param_sq.size)
    for k in range(param_sq.size):
        if param_sq[k] != 0 and grad_sq[k] != 0:
            param_norm = np.sqrt(param_sq[k])
            local_lr[k] = coefficient * param_norm / (np.sqrt(grad_sq[k])
                                                      + weight_decay * param_norm)
    return local_lr


class LAMB(LayerWise):
    r"""LAMB, Adam with a per-tensor trust ratio; You et al. (2019), Algorithm 2.

    For each parameter tensor (layer) :math:`x`:

    .. math::
        m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1)\,g_t, \qquad
        v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2)\,g_t^2 \\
        r_t &\leftarrow \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon},
            \qquad u_t \leftarrow r_t + \lambda\,x_{t-1} \\
        x_t &\leftarrow x_{t-1} - \gamma\,\frac{\lVert x_{t-1} \rVert}{\lVert u_t \rVert}\,u_t

    with the norms over the whole tensor, and a trust ratio of 1 where either norm is 0
    (φ is the identity). A step takes two passes: the first moves the moments and sums
    :math:`\lVert x\rVert^2` and :math:`\lVert u\rVert^2` per tensor (a segmented
    reduction over the flattening layout's tensor boundaries, in float64, with a result
    independent of the thread count); the second recomputes :math:`u` and steps.

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt` with ``shapes`` (each shape is one tensor; without shapes
            the whole buffer is one tensor), or a list of parameter-group dicts.
        lr (γ), betas (β₁, β₂), eps (ε), weight_decay (λ, decoupled: inside u), maximize.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``exp_avg`` (m) and ``exp_avg_sq`` (v), 8 bytes per parameter; a step moves
    40 bytes per parameter (24 in the first pass, 16 in the second).

    References:
        You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in
        76 minutes", ICLR, arXiv:1904.00962.
    """

    spec = hp.Spec(
        rule="lamb", moves=40, passes=(hp.MAP_REDUCE, hp.MAP), per_tensor=True,
        # The trust ratio scales a tensor's update to the parameters' norm, however small:
        # updates of gradients near 1e-38, flushed to 0, stood still where the algorithm
        # (and CUDA, which keeps subnormals) takes a full step.
        keeps_subnormals=True,
        hyperparameters=(hp.lr(1e-3), hp.betas((0.9, 0.999)), hp.eps(1e-6), hp.weight_decay(),
                         hp.maximize()),
        bench=dict(lr=1e-3), check=dict(lr=0.05))

    # The first pass moves the moments and sums the norms, the second steps.
    MOMENTS = Pass("lamb", ("exp_avg", "exp_avg_sq"), writes=("exp_avg", "exp_avg_sq"),
                   sums=("param_sq", "update_sq"))
    STEP = Pass("lamb", ("exp_avg", "exp_avg_sq"), writes=("p",), grad=False,
                per_segment=("trust_lr", "trust_scale"))

    @staticmethod
    def buffers(group, host):
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    @staticmethod
    def scalars(group, step, fresh, host):
        beta1, beta2 = group["betas"]
        # trust_lr differs per tensor: the second pass takes each tensor's own.
        return rules.LAMBScalars.of(trust_lr=0.0, trust_scale=1.0,
                                 weight_decay=group["weight_decay"],
                                 inv_bc1=1.0 / (1.0 - beta1 ** step),
                                 inv_bc2_sqrt=1.0 / math.sqrt(1.0 - beta2 ** step),
                                 eps=group["eps"], one_minus_beta1=1.0 - beta1,
                                 beta2=beta2, one_minus_beta2=1.0 - beta2, moving=True)

    @classmethod
    def update(cls, work, group, step, h, host):
        param_sq, update_sq = work.run(cls.MOMENTS, h)
        trust_lr = group["lr"] * lamb_trust_ratio(param_sq, update_sq)
        work.run(cls.STEP, h._replace(moving=False), values=in_float32_range(trust_lr))
        return host


class LARS(LayerWise):
    r"""LARS, SGD with momentum and a per-tensor local learning rate; You, Gitman &
    Ginsburg (2017), Algorithm 1.

    For each parameter tensor (layer) :math:`w`:

    .. math::
        \lambda_t &\leftarrow \eta\,\frac{\lVert w_{t-1} \rVert}
            {\lVert g_t \rVert + \beta\,\lVert w_{t-1} \rVert} \\
        v_t &\leftarrow m\,v_{t-1} + \gamma\,\lambda_t\,(g_t + \beta\,w_{t-1}), \qquad
        w_t \leftarrow w_{t-1} - v_t

    with the norms over the whole tensor, and :math:`\lambda_t = 1` where
    :math:`\lVert w \rVert` or :math:`\lVert g \rVert` is 0, as optax and torchlars do
    (so a tensor that starts at zero, such as a bias, still moves). The paper scales
    γ with the batch size; with η = 0.001, γ = 1 moves each tensor by about 0.1% of its
    norm per step. A step takes two passes: one segmented reduction of
    :math:`\lVert w\rVert^2` and :math:`\lVert g\rVert^2` per tensor (float64,
    independent of the thread count), then the update.

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt` with ``shapes``, or a list of parameter-group dicts.
        lr (γ), momentum (m), weight_decay (β), trust_coefficient (η), maximize.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``momentum_buffer`` (v), 4 bytes per parameter, kept even with momentum 0;
    a step moves 28 bytes per parameter (8 in the first pass, 20 in the second).

    References:
        You, Gitman & Ginsburg, 2017, "Large Batch Training of Convolutional Networks",
        arXiv:1708.03888.
    """

    spec = hp.Spec(
        rule="lars", moves=28, passes=(hp.REDUCE, hp.MAP), per_tensor=True,
        keeps_subnormals=True,  # as LAMB: the trust ratio makes a full step of any gradient
        hyperparameters=(hp.lr(1.0), hp.nonnegative("momentum", 0.9), hp.weight_decay(),
                         hp.nonnegative("trust_coefficient", 1e-3), hp.maximize()),
        bench=dict(lr=1.0), check=dict(lr=5.0))

    # The first pass sums the norms, the second steps.
    NORMS = Pass("norms", sums=("param_sq", "grad_sq"))
    STEP = Pass("lars", ("momentum_buffer",), per_segment=("trust_lr", "trust_scale"))

    @staticmethod
    def buffers(group, host):
        return {"momentum_buffer": 0.0}

    @staticmethod
    def scalars(group, step, fresh, host):
        # trust_lr differs per tensor: the kernel takes each tensor's from an array.
        return rules.LARSScalars.of(trust_lr=0.0, trust_scale=1.0, momentum=group["momentum"],
                                 weight_decay=group["weight_decay"])

    @classmethod
    def update(cls, work, group, step, h, host):
        param_sq, grad_sq = work.run(cls.NORMS, rules.NoScalars.of())
        local_lr = lars_local_lr(param_sq, grad_sq, float(group["trust_coefficient"]),
                                 float(group["weight_decay"]))
        work.run(cls.STEP, h, values=in_float32_range(group["lr"] * local_lr))
        return host
