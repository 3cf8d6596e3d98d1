from ..kernels import rules
from . import spec as hp
from .optimizer import Optimizer


class Adamax(Optimizer):
    r"""Adamax, Adam's infinity-norm variant; torch.optim.Adamax.

    .. math::
        g_t &\leftarrow \pm\nabla f(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1)\,g_t \\
        u_t &\leftarrow \max(\beta_2 u_{t-1},\ |g_t| + \epsilon) \\
        \theta_t &\leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,\frac{m_t}{u_t}

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ), betas (β₁, β₂), eps (ε), weight_decay (λ), maximize: as in
        torch.optim.Adamax, with the same defaults.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``exp_avg`` (m) and ``exp_inf`` (u), 8 bytes per parameter.

    References:
        Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization", section 7.
    """

    spec = hp.Spec(
        averages={"exp_avg": hp.SIGNED, "exp_inf": hp.UNSIGNED},
        rule="adamax", torch="Adamax", moves=28,
        hyperparameters=(hp.lr(2e-3), hp.betas((0.9, 0.999)), hp.eps(1e-8), hp.weight_decay(),
                         hp.maximize()),
        bench=dict(lr=1e-3), check=dict(lr=0.05))

    @staticmethod
    def buffers(group, host):
        return {"exp_avg": 0.0, "exp_inf": 0.0}

    @staticmethod
    def scalars(group, step, fresh, host):
        beta1, beta2 = group["betas"]
        clr = group["lr"] / (1.0 - beta1 ** step)
        return rules.AdamaxScalars.of(clr=clr, eps=group["eps"],
                                   one_minus_beta1=1.0 - beta1, beta2=beta2)
