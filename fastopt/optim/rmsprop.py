from ..kernels import rules
from . import spec as hp
from .optimizer import Optimizer


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
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ), alpha (α), eps (ε), weight_decay (λ), momentum (μ), centered, maximize:
        as in torch.optim.RMSprop, with the same defaults.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``square_avg``, plus ``grad_avg`` if centered and ``momentum_buffer`` if
    momentum > 0 (4 to 12 bytes per parameter).

    References:
        Hinton, Srivastava & Swersky, 2012, "Neural Networks for Machine Learning",
        lecture 6e; Graves, 2013, "Generating Sequences With Recurrent Neural Networks"
        (the centered form).
    """

    spec = hp.Spec(
        averages={"square_avg": hp.UNSIGNED, "grad_avg": hp.SIGNED,
                  "momentum_buffer": hp.SIGNED},
        rule="rmsprop", torch="RMSprop", moves=20,
        hyperparameters=(hp.lr(1e-2), hp.nonnegative("alpha", 0.99), hp.eps(1e-8),
                         hp.weight_decay(), hp.nonnegative("momentum", 0.0),
                         hp.flag("centered"), hp.maximize()),
        bench=dict(lr=1e-3), check=dict(lr=0.01))

    @staticmethod
    def buffers(group, host):
        spec = {"square_avg": 0.0}
        if group["centered"]:
            spec["grad_avg"] = 0.0
        if group["momentum"] > 0:
            spec["momentum_buffer"] = 0.0
        return spec

    @staticmethod
    def scalars(group, step, fresh, host):
        alpha = group["alpha"]
        return rules.RMSpropScalars.of(lr=group["lr"], alpha=alpha,
                                    one_minus_alpha=1.0 - alpha, eps=group["eps"],
                                    momentum=group["momentum"],
                                    centered=bool(group["centered"]))
