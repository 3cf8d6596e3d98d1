from ..kernels import rules
from . import spec as hp
from .optimizer import Optimizer, decoupled_decay


class NAdam(Optimizer):
    r"""NAdam, Adam with Nesterov momentum; torch.optim.NAdam.

    .. math::
        g_t &\leftarrow \pm\nabla f(\theta_{t-1}) + \lambda\,\theta_{t-1}
            \quad\text{(or } \theta_{t-1} \leftarrow (1 - \gamma\lambda)\,\theta_{t-1}
            \text{ if decoupled)} \\
        \mu_t &\leftarrow \beta_1 \bigl(1 - \tfrac12\,0.96^{t\psi}\bigr), \quad
            \Pi_t \leftarrow \prod_{i \le t} \mu_i \\
        m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1)\,g_t \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2)\,g_t^2 \\
        d_t &\leftarrow \sqrt{v_t / (1 - \beta_2^t)} + \epsilon \\
        \theta_t &\leftarrow \theta_{t-1}
            - \gamma\,\frac{1 - \mu_t}{1 - \Pi_t}\,\frac{g_t}{d_t}
            - \gamma\,\frac{\mu_{t+1}}{1 - \Pi_t\,\mu_{t+1}}\,\frac{m_t}{d_t}

    The momentum schedule :math:`\mu_t` and its running product are computed on the
    host in float64; ``state["mu_product"][i]`` holds :math:`\Pi_t` of group i.

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ), betas (β₁, β₂), eps (ε), weight_decay (λ), momentum_decay (ψ),
        decoupled_weight_decay, maximize: as in torch.optim.NAdam, with the same
        defaults.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``exp_avg`` (m) and ``exp_avg_sq`` (v), 8 bytes per parameter.

    References:
        Dozat, 2016, "Incorporating Nesterov Momentum into Adam".
    """

    spec = hp.Spec(
        averages={"exp_avg": hp.SIGNED, "exp_avg_sq": hp.UNSIGNED},
        rule="nadam", torch="NAdam", moves=28, host={"mu_product": 1.0},
        hyperparameters=(hp.lr(2e-3), hp.betas((0.9, 0.999)), hp.eps(1e-8), hp.weight_decay(),
                         hp.nonnegative("momentum_decay", 4e-3),
                         hp.flag("decoupled_weight_decay"), hp.maximize()),
        bench=dict(lr=1e-3), check=dict(lr=0.05))

    @staticmethod
    def buffers(group, host):
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    @staticmethod
    def host_after(group, step, host):
        return {"mu_product": _momentum(group, step, host)[2]}

    @staticmethod
    def scalars(group, step, fresh, host):
        lr, (beta1, beta2) = group["lr"], group["betas"]
        mu, mu_next, mu_product = _momentum(group, step, host)
        grad_coef = lr * (1.0 - mu) / (1.0 - mu_product)
        avg_coef = lr * mu_next / (1.0 - mu_product * mu_next)
        return rules.NAdamScalars.of(decay=decoupled_decay(group), grad_coef=grad_coef,
                                  avg_coef=avg_coef, inv_bc2=1.0 / (1.0 - beta2 ** step),
                                  eps=group["eps"], one_minus_beta1=1.0 - beta1,
                                  beta2=beta2, one_minus_beta2=1.0 - beta2)


def _momentum(group, step, host):
    """mu_t, mu_(t+1) and the product of mu_1 .. mu_t."""
    beta1, psi = group["betas"][0], group["momentum_decay"]
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
    return mu, mu_next, host["mu_product"] * mu
