from ..kernels import rules
from . import spec as hp
from .optimizer import Optimizer


class Lion(Optimizer):
    r"""Lion, the sign of an interpolated momentum; Chen et al. (2023), Algorithm 2.

    .. math::
        c_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1)\,g_t \\
        \theta_t &\leftarrow (1 - \gamma\lambda)\,\theta_{t-1}
            - \gamma\,\operatorname{sign}(c_t) \\
        m_t &\leftarrow \beta_2 m_{t-1} + (1 - \beta_2)\,g_t

    Every element moves by exactly γ (plus the decoupled weight decay), so Lion wants
    a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger, as the
    paper advises. :math:`\operatorname{sign}(0) = 0`, and a NaN stays NaN: where
    torch.sign maps NaN to 0, a NaN gradient would poison the momentum and then freeze
    the parameter without a trace.

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ), betas (β₁, β₂), weight_decay (λ, decoupled as in AdamW), maximize.
        caution: the sign steps only where it agrees with the gradient, as in
            :class:`Adam` (and timm's Lion).
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``exp_avg`` (m), 4 bytes per parameter; a step moves 20 bytes per
    parameter.

    References:
        Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms",
        arXiv:2302.06675.
    """

    spec = hp.Spec(
        averages={"exp_avg": hp.SIGNED},
        rule="lion", moves=20,
        # It steps by lr times the sign of its update: a subnormal one flushed to 0 left
        # an element standing where torch steps it by lr (frozen rows stopped early).
        keeps_subnormals=True,
        hyperparameters=(hp.lr(1e-4), hp.betas((0.9, 0.99)), hp.weight_decay(), hp.flag("caution"),
                         hp.maximize()),
        bench=dict(lr=1e-4), check=dict(lr=0.005))

    @staticmethod
    def buffers(group, host):
        return {"exp_avg": 0.0}

    @staticmethod
    def l2(group):
        return 0.0  # the decay is decoupled

    @staticmethod
    def scalars(group, step, fresh, host):
        lr, (beta1, beta2) = group["lr"], group["betas"]
        return rules.LionScalars.of(decay=1.0 - lr * group["weight_decay"], lr=lr,
                                 beta1=beta1, one_minus_beta1=1.0 - beta1,
                                 beta2=beta2, one_minus_beta2=1.0 - beta2, one=1.0,
                                 caution=bool(group["caution"]), caution_scale=1.0,
                                 zero=0.0)
