import math

from ..kernels import rules
from . import spec as hp
from .checks import check_betas
from .optimizer import Optimizer


class Adan(Optimizer):
    r"""Adan, adaptive Nesterov momentum; Xie et al. (2022), as timm.optim.Adan computes it.

    .. math::
        \Delta_t &\leftarrow g_t - g_{t-1} \quad (0 \text{ on the first step}) \\
        m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1)\,g_t \\
        d_t &\leftarrow \beta_2 d_{t-1} + (1 - \beta_2)\,\Delta_t \\
        n_t &\leftarrow \beta_3 n_{t-1} + (1 - \beta_3)\,(g_t + \beta_2 \Delta_t)^2 \\
        \eta_t &\leftarrow \sqrt{n_t} / \sqrt{1 - \beta_3^t} + \epsilon \\
        \theta_t &\leftarrow \Big(\theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
            \frac{m_t}{\eta_t} - \frac{\gamma\,\beta_2}{1 - \beta_2^t}\,
            \frac{d_t}{\eta_t}\Big) \Big/ (1 + \gamma\lambda)

    The betas weigh the old moments, as in timm and Adam (the paper's :math:`1 - \beta`).
    The weight decay is the proximal step above, or with ``no_prox=True`` decoupled as in
    AdamW: :math:`\theta_{t-1} \leftarrow (1 - \gamma\lambda)\,\theta_{t-1}` before the
    update, and no division. One fused pass per step, as the kernels compute it:
    timm's operations in timm's order.

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ), betas (β₁, β₂, β₃), eps (ε), weight_decay (λ), no_prox, caution: as in
            timm.optim.Adan, with the same defaults (``caution``: see :class:`Adam`).
        maximize: fastopt's, as in the others: ascend instead.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``exp_avg`` (m), ``exp_avg_sq`` (n), ``exp_avg_diff`` (d) and ``prev_grad``
    (the gradient of the last step, as the kernel received it): 16 bytes per parameter;
    a step moves 44.

    References:
        Xie, Zhou, Li, Lin & Yan, 2022, "Adan: Adaptive Nesterov Momentum Algorithm for
        Faster Optimizing Deep Models", arXiv:2208.06677.
    """

    spec = hp.Spec(
        averages={"exp_avg": hp.SIGNED, "exp_avg_sq": hp.UNSIGNED,
                  "exp_avg_diff": hp.SIGNED},
        rule="adan", moves=44,
        hyperparameters=(hp.lr(1e-3), hp.Hyperparameter("betas", (0.98, 0.92, 0.99),
                                                            lambda betas: check_betas(betas, 3)),
                         hp.eps(1e-8), hp.weight_decay(), hp.flag("no_prox"), hp.flag("caution"),
                         hp.maximize()),
        bench=dict(lr=1e-3), check=dict(lr=0.05))

    @staticmethod
    def l2(group):
        return 0.0  # the decay is proximal or decoupled

    @staticmethod
    def buffers(group, host):
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0, "exp_avg_diff": 0.0, "prev_grad": 0.0}

    @staticmethod
    def scalars(group, step, fresh, host):
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2, beta3 = group["betas"]
        no_prox = group["no_prox"]
        return rules.AdanScalars.of(
            decay=1.0 - lr * weight_decay if no_prox else 1.0,
            step_size=lr / (1.0 - beta1 ** step),
            step_size_diff=lr * beta2 / (1.0 - beta2 ** step),
            bc3_sqrt=math.sqrt(1.0 - beta3 ** step), eps=group["eps"],
            one_minus_beta1=1.0 - beta1, beta2=beta2,
            one_minus_beta2=1.0 - beta2, beta3=beta3, one_minus_beta3=1.0 - beta3,
            prox=1.0 if no_prox else 1.0 + lr * weight_decay,
            has_prev_grad="prev_grad" not in fresh, caution=bool(group["caution"]),
            caution_scale=1.0, zero=0.0)
