import math

import numpy as np

from ..kernels import Pass, rules
from . import spec as hp
from .optimizer import Optimizer


class SWATS(Optimizer):
    r"""SWATS: Adam that switches to SGD once its SGD learning-rate estimate settles.

    Algorithm 1 of Keskar & Socher (2017), applied to each parameter group on its own.
    In the Adam phase, step :math:`k`:

    .. math::
        m_k &\leftarrow \beta_1 m_{k-1} + (1 - \beta_1)\,g_k \\
        a_k &\leftarrow \beta_2 a_{k-1} + (1 - \beta_2)\,g_k^2 \\
        p_k &\leftarrow -\alpha\,\frac{\sqrt{1 - \beta_2^k}}{1 - \beta_1^k}\,
            \frac{m_k}{\sqrt{a_k} + \epsilon}, \qquad w_k \leftarrow w_{k-1} + p_k \\
        \gamma_k &\leftarrow \frac{p_k^\top p_k}{-p_k^\top g_k}, \qquad
        \lambda_k \leftarrow \beta_2 \lambda_{k-1} + (1 - \beta_2)\,\gamma_k
            \quad\text{(when } p_k^\top g_k \ne 0\text{)}

    and when :math:`k > 1` and :math:`|\lambda_k / (1 - \beta_2^k) - \gamma_k| < \epsilon`
    the group switches to SGD with momentum and the fixed learning rate
    :math:`\Lambda = \lambda_k / (1 - \beta_2^k)`:

    .. math::
        v_k \leftarrow \beta_1 v_{k-1} + g_k, \qquad
        w_k \leftarrow w_{k-1} - (1 - \beta_1)\,\Lambda\,v_k \quad (v = 0 \text{ at the switch})

    The Adam step and the two dot products :math:`d^\top d` and :math:`d^\top g` (where
    :math:`p_k = -\text{coef}\cdot d`) come from one fused pass with a deterministic
    reduction; :math:`\gamma`, :math:`\lambda` and the switch are decided on the host.
    ``lr`` (α) drives the Adam phase only: after the switch the SGD rate is Λ, as in the
    paper, whatever ``lr`` does.

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts. Each group switches
            on its own.
        lr (α), betas (β₁, β₂), eps (ε, in the Adam denominator and the switching test;
        the paper's 1e-9), weight_decay (an L2 penalty), maximize.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`Optimizer`.

    State: ``exp_avg`` (m) and ``exp_avg_sq`` (a) for the Adam phase, 8 bytes per
    parameter, and from the first switch ``momentum_buffer`` (v) too: 12 bytes, since the
    buffers span every group. Per group: ``lr_estimate`` (λ), ``sgd_lr`` (Λ, None before
    the switch) and ``switch_step`` (the step that switched, or None).

    References:
        Keskar & Socher, 2017, "Improving Generalization Performance by Switching from
        Adam to SGD", arXiv:1712.07628.
    """

    spec = hp.Spec(
        rule="swats_adam", moves=28, passes=(hp.MAP_REDUCE,),
        host={"lr_estimate": 0.0, "sgd_lr": None, "switch_step": None},
        hyperparameters=(hp.lr(1e-3), hp.betas((0.9, 0.999)), hp.eps(1e-9), hp.weight_decay(),
                         hp.maximize()),
        bench=dict(lr=1e-3), check=dict(lr=0.05, eps=1e-6))

    # The Adam phase, summing d.d and d.g per tensor; then SGD with momentum.
    ADAM_PHASE = Pass("swats_adam", ("exp_avg", "exp_avg_sq"),
                      sums=("direction_sq", "direction_g"))
    SGD_PHASE = Pass("sgd", ("momentum_buffer",))

    @staticmethod
    def buffers(group, host):
        if host["sgd_lr"] is not None:
            return {"momentum_buffer": 0.0}
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    @staticmethod
    def scalars(group, step, fresh, host):
        beta1, beta2 = group["betas"]
        if host["sgd_lr"] is not None:
            return rules.SGDScalars.of(lr=(1.0 - beta1) * host["sgd_lr"], momentum=beta1,
                                    grad_weight=1.0, nesterov=False)
        coef = group["lr"] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
        # coef in float32 here, as the kernel steps by it: the switch test reads it back.
        return rules.SWATSAdamScalars.of(coef=np.float32(coef), eps=group["eps"],
                                      one_minus_beta1=1.0 - beta1, beta2=beta2,
                                      one_minus_beta2=1.0 - beta2)

    @classmethod
    def update(cls, work, group, step, h, host):
        return cls.update_runs([work], group, step, h, host)

    @classmethod
    def update_runs(cls, works, group, step, h, host):
        if host["sgd_lr"] is not None:
            for work in works:
                work.run(cls.SGD_PHASE, h)
            return host
        # The sums over the whole group: every tensor's sums, added exactly.
        sums = [work.run(cls.ADAM_PHASE, h) for work in works]
        direction_sq, direction_g = (math.fsum(np.concatenate(parts)) for parts in zip(*sums))
        return _estimate(group, step, host, float(h.coef), direction_sq, direction_g)


def _estimate(group, step, host, coef, direction_sq, direction_g):
    """The host state after an Adam step p_k = -coef * d: λ updated from γ, and the
    switch recorded once the estimate has settled."""
    beta2, eps = group["betas"][1], group["eps"]
    projection = -coef * direction_g  # p_k . g_k
    if projection == 0.0 or not math.isfinite(projection):
        return host
    gamma = coef * coef * direction_sq / -projection
    estimate = beta2 * host["lr_estimate"] + (1.0 - beta2) * gamma
    corrected = estimate / (1.0 - beta2 ** step)
    if step > 1 and abs(corrected - gamma) < eps:
        return {"lr_estimate": estimate, "sgd_lr": corrected, "switch_step": step}
    return dict(host, lr_estimate=estimate)
