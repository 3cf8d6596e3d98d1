import math

from ..kernels import rules
from . import spec as hp
from .optimizer import Optimizer, decoupled_decay


class Adam(Optimizer):
    r"""Adam, with the AMSGrad variant and optional decoupled weight decay; torch.optim.Adam.

    .. math::
        g_t &\leftarrow \pm\nabla f(\theta_{t-1}) + \lambda\,\theta_{t-1}
            \quad\text{(L2; or } \theta_{t-1} \leftarrow (1 - \gamma\lambda)\,
            \theta_{t-1} \text{ if decoupled)} \\
        m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1)\,g_t \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2)\,g_t^2 \\
        \hat v_t &\leftarrow \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t \\
        \theta_t &\leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    eps is added after bias-correcting :math:`\sqrt{\hat v_t}`. With
    ``bias_correction=False`` both corrections are left out:
    :math:`\theta_t \leftarrow \theta_{t-1} - \gamma\,m_t / (\sqrt{\hat v_t} + \epsilon)`.
    The step count and the corrections are computed on the host in float64.

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ), betas (β₁, β₂), eps (ε), weight_decay (λ), amsgrad, maximize,
        decoupled_weight_decay: as in torch.optim.Adam, with the same defaults.
        bias_correction: fastopt's own; False skips both bias corrections.
        caution: fastopt's own (timm's AdamW has it): the Cautious Optimizers mask
            (Liang et al. 2024) as timm computes it, :math:`m_t` stepping only where it
            agrees in sign with :math:`g_t`, scaled by 1 / max(the share of its tensor
            that agrees, 1e-3). A cautious step takes two passes over the tensors: one
            counts the agreement, one steps.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``exp_avg`` (m) and ``exp_avg_sq`` (v), plus ``max_exp_avg_sq`` with
    amsgrad: 8 or 12 bytes per parameter. A step moves 28 bytes per parameter (36 with
    amsgrad).

    References:
        Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization"; Reddi, Kale &
        Kumar, 2018, "On the Convergence of Adam and Beyond" (AMSGrad); Loshchilov &
        Hutter, 2019, "Decoupled Weight Decay Regularization".
    """

    spec = hp.Spec(
        averages={"exp_avg": hp.SIGNED, "exp_avg_sq": hp.UNSIGNED,
                  "max_exp_avg_sq": hp.UNSIGNED},
        rule="adam", torch="Adam", moves=28,
        hyperparameters=(hp.lr(1e-3), hp.betas((0.9, 0.999)), hp.eps(1e-8), hp.weight_decay(),
                         hp.flag("amsgrad"), hp.maximize(),
                         hp.flag("decoupled_weight_decay", keyword_only=True),
                         hp.flag("bias_correction", True, keyword_only=True),
                         hp.flag("caution", keyword_only=True)),
        bench=dict(lr=1e-3), check=dict(lr=0.05))

    @staticmethod
    def buffers(group, host):
        spec = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
        if group["amsgrad"]:
            spec["max_exp_avg_sq"] = 0.0
        return spec

    @staticmethod
    def scalars(group, step, fresh, host):
        lr, (beta1, beta2) = group["lr"], group["betas"]
        if group["bias_correction"]:
            step_size = lr / (1.0 - beta1 ** step)
            inv_bc2_sqrt = 1.0 / math.sqrt(1.0 - beta2 ** step)
        else:
            step_size, inv_bc2_sqrt = lr, 1.0
        return rules.AdamScalars.of(decay=decoupled_decay(group), step_size=step_size,
                                 inv_bc2_sqrt=inv_bc2_sqrt, eps=group["eps"],
                                 one_minus_beta1=1.0 - beta1, beta2=beta2,
                                 one_minus_beta2=1.0 - beta2, amsgrad=bool(group["amsgrad"]),
                                 caution=bool(group["caution"]), caution_scale=1.0,
                                 zero=0.0)


class AdamW(Adam):
    r"""Adam with decoupled weight decay; torch.optim.AdamW.

    The update of :class:`Adam` with ``decoupled_weight_decay=True``: before the Adam
    step the parameters shrink by :math:`\theta \leftarrow (1 - \gamma\lambda)\,\theta`,
    and the gradient carries no L2 term. The default ``weight_decay`` is 1e-2.

    References:
        Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization".
    """

    spec = Adam.spec.variant(torch="AdamW", defaults={"weight_decay": 1e-2},
                             fixed={"decoupled_weight_decay": True})
