from .optimizer import Optimizer, check_eps, check_flag, check_lr, check_nonnegative, f32, real


class Adadelta(Optimizer):
    r"""Adadelta; torch.optim.Adadelta.

    .. math::
        g_t &\leftarrow \pm\nabla f(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        v_t &\leftarrow \rho\,v_{t-1} + (1 - \rho)\,g_t^2 \\
        \Delta_t &\leftarrow \sqrt{u_{t-1} + \epsilon}\,/\,\sqrt{v_t + \epsilon}\;g_t \\
        u_t &\leftarrow \rho\,u_{t-1} + (1 - \rho)\,\Delta_t^2 \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma\,\Delta_t

    eps is inside both square roots.

    Args:
        params: a dict or list of float32 arrays (copied), :func:`fastopt.adopt`, or
            a list of parameter-group dicts.
        lr (γ), rho (ρ), eps (ε), weight_decay (λ), maximize: as in
        torch.optim.Adadelta, with the same defaults.
        **options: ``clip_grad_norm``, ``clip_grad_value``, ``skip_nonfinite``; see
            :class:`fastopt.Optimizer`.

    State: ``square_avg`` (v) and ``acc_delta`` (u), 8 bytes per parameter.

    References:
        Zeiler, 2012, "ADADELTA: An Adaptive Learning Rate Method".
    """

    rule = "adadelta"

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *,
                 maximize=False, **options):
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check(self, group):
        check_lr(group["lr"])
        if not 0.0 <= real("rho", group["rho"]) <= 1.0:
            raise ValueError(f"Invalid rho value: {group['rho']} (expected 0 <= rho <= 1)")
        check_eps(group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_flag("maximize", group["maximize"])

    def _state_spec(self, group, host):
        return {"square_avg": 0.0, "acc_delta": 0.0}

    def _scalars(self, group, step, fresh, host):
        rho = group["rho"]
        return (f32(group["lr"]), f32(rho),
                f32(1.0 - rho), f32(group["eps"]))
