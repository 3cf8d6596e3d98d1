from .optimizer import Optimizer, check_eps, check_flag, check_lr, check_nonnegative, f32


class RMSprop(Optimizer):
    r"""RMSprop, optionally centered and with momentum; torch.optim.RMSprop.

    .. math::
        g_t &\leftarrow \pm\nabla f(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        v_t &\leftarrow \alpha\,v_{t-1} + (1 - \alpha)\,g_t^2 \\
        \bar g_t &\leftarrow \alpha\,\bar g_{t-1} + (1 - \alpha)\,g_t
            \quad\text{(centered only)} \\
        a_t &\leftarrow \sqrt{v_t - \bar g_t^2} + \epsilon
            \text{ if centered else } \sqrt{v_t} + \epsilon \\
        b_t &\leftarrow \mu\,b_{t-1} + g_t / a_t \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma\,b_t

    eps is added outside the square root. With ``momentum=0`` there is no buffer and
    the step is :math:`\gamma\,g_t / a_t`.

    Args:
        params: a dict or list of float32 arrays (copied), :func:`fastopt.adopt`, or
            a list of parameter-group dicts.
        lr (γ), alpha (α), eps (ε), weight_decay (λ), momentum (μ), centered, maximize:
        as in torch.optim.RMSprop, with the same defaults.
        **options: ``clip_grad_norm``, ``clip_grad_value``, ``skip_nonfinite``; see
            :class:`fastopt.Optimizer`.

    State: ``square_avg``, plus ``grad_avg`` if centered and ``momentum_buffer`` if
    momentum > 0 (4 to 12 bytes per parameter).

    References:
        Hinton, Srivastava & Swersky, 2012, "Neural Networks for Machine Learning",
        lecture 6e; Graves, 2013, "Generating Sequences With Recurrent Neural Networks"
        (the centered form).
    """

    rule = "rmsprop"

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False, *, maximize=False, **options):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check(self, group):
        check_lr(group["lr"])
        check_eps(group["eps"])
        check_nonnegative("momentum", group["momentum"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_nonnegative("alpha", group["alpha"])
        check_flag("centered", group["centered"])
        check_flag("maximize", group["maximize"])

    def _state_spec(self, group, host):
        spec = {"square_avg": 0.0}
        if group["centered"]:
            spec["grad_avg"] = 0.0
        if group["momentum"] > 0:
            spec["momentum_buffer"] = 0.0
        return spec

    def _scalars(self, group, step, fresh, host):
        alpha = group["alpha"]
        return (f32(group["lr"]), f32(alpha),
                f32(1.0 - alpha), f32(group["eps"]), f32(group["momentum"]),
                bool(group["centered"]))
