from .optimizer import Optimizer, check_eps, check_flag, check_lr, check_nonnegative, f32


class Adagrad(Optimizer):
    r"""Adagrad; torch.optim.Adagrad.

    .. math::
        g_t &\leftarrow \pm\nabla f(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        \tilde\gamma_t &\leftarrow \gamma / (1 + (t - 1)\,\eta) \\
        s_t &\leftarrow s_{t-1} + g_t^2 \\
        \theta_t &\leftarrow \theta_{t-1} - \tilde\gamma_t\,g_t / (\sqrt{s_t} + \epsilon)

    Args:
        params: a dict or list of float32 arrays (copied), :func:`fastopt.adopt`, or
            a list of parameter-group dicts.
        lr (γ), lr_decay (η), weight_decay (λ), initial_accumulator_value (s₀), eps (ε),
        maximize: as in torch.optim.Adagrad, with the same defaults.
        **options: ``clip_grad_norm``, ``clip_grad_value``, ``skip_nonfinite``; see
            :class:`fastopt.Optimizer`.

    State: ``sum`` (4 bytes per parameter), starting at ``initial_accumulator_value``.

    References:
        Duchi, Hazan & Singer, 2011, "Adaptive Subgradient Methods for Online Learning
        and Stochastic Optimization".
    """

    rule = "adagrad"

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, *, maximize=False, **options):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps,
                        maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check(self, group):
        check_lr(group["lr"])
        check_nonnegative("lr_decay", group["lr_decay"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_nonnegative("initial_accumulator_value", group["initial_accumulator_value"],
                          "initial_accumulator_value value")
        check_eps(group["eps"])
        check_flag("maximize", group["maximize"])

    def _state_spec(self, group, host):
        return {"sum": group["initial_accumulator_value"]}

    def _scalars(self, group, step, fresh, host):
        clr = group["lr"] / (1.0 + (step - 1) * group["lr_decay"])
        return f32(clr), f32(group["eps"])
