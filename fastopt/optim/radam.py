import math

from ..kernels import rules
from . import spec as hp
from .optimizer import Optimizer, decoupled_decay

# Below this length of the approximated simple moving average, RAdam does not trust its
# variance estimate and takes a momentum step; torch.optim.RAdam's threshold.
RHO_THRESHOLD = 5.0


class RAdam(Optimizer):
    r"""RAdam, Adam with a rectified adaptive learning rate; torch.optim.RAdam.

    .. math::
        g_t &\leftarrow \pm\nabla f(\theta_{t-1}) + \lambda\,\theta_{t-1}
            \quad\text{(L2; or } \theta_{t-1} \leftarrow (1 - \gamma\lambda)\,
            \theta_{t-1} \text{ if decoupled)} \\
        m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1)\,g_t, \qquad
        v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2)\,g_t^2 \\
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
        \theta_t &\leftarrow \begin{cases}
            \theta_{t-1} - \gamma\,\frac{m_t}{1 - \beta_1^t}\,r_t\,
                \frac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon} & \rho_t > 5 \\
            \theta_{t-1} - \gamma\,\frac{m_t}{1 - \beta_1^t} & \text{otherwise}
        \end{cases} \\
        r_t &= \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\,\rho_\infty}
                          {(\rho_\infty - 4)(\rho_\infty - 2)\,\rho_t}}

    eps is added to the uncorrected :math:`\sqrt{v_t}`, as in torch. The rectification
    term and the bias corrections are computed on the host in float64.

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ), betas (β₁, β₂), eps (ε), weight_decay (λ), decoupled_weight_decay,
        maximize: as in torch.optim.RAdam, with the same defaults.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``exp_avg`` (m) and ``exp_avg_sq`` (v), 8 bytes per parameter; a step moves
    28 bytes per parameter.

    References:
        Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond",
        arXiv:1908.03265.
    """

    spec = hp.Spec(
        averages={"exp_avg": hp.SIGNED, "exp_avg_sq": hp.UNSIGNED},
        rule="radam", torch="RAdam", moves=28,
        hyperparameters=(hp.lr(1e-3), hp.betas((0.9, 0.999)), hp.eps(1e-8), hp.weight_decay(),
                         hp.flag("decoupled_weight_decay"), hp.maximize()),
        bench=dict(lr=1e-3), check=dict(lr=0.05))

    @staticmethod
    def buffers(group, host):
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    @staticmethod
    def scalars(group, step, fresh, host):
        lr, (beta1, beta2) = group["lr"], group["betas"]
        bias_correction1, bias_correction2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho = rho_inf - 2.0 * step * beta2 ** step / bias_correction2
        rectified = rho > RHO_THRESHOLD
        step_size = lr / bias_correction1
        if rectified:
            step_size *= math.sqrt((rho - 4.0) * (rho - 2.0) * rho_inf
                                   / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))
            step_size *= math.sqrt(bias_correction2)
        return rules.RAdamScalars.of(decay=decoupled_decay(group), step_size=step_size,
                                  eps=group["eps"], one_minus_beta1=1.0 - beta1,
                                  beta2=beta2, one_minus_beta2=1.0 - beta2,
                                  rectified=rectified)
