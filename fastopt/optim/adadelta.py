from ..kernels import rules
from . import spec as hp
from .checks import real
from .optimizer import Optimizer


def _check_rho(rho):
    if not 0.0 <= real("rho", rho) <= 1.0:
        raise ValueError(f"Invalid rho value: {rho} (expected 0 <= rho <= 1)")


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
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ), rho (ρ), eps (ε), weight_decay (λ), maximize: as in
        torch.optim.Adadelta, with the same defaults.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``square_avg`` (v) and ``acc_delta`` (u), 8 bytes per parameter.

    References:
        Zeiler, 2012, "ADADELTA: An Adaptive Learning Rate Method".
    """

    spec = hp.Spec(
        averages={"square_avg": hp.UNSIGNED, "acc_delta": hp.UNSIGNED},
        rule="adadelta", torch="Adadelta", moves=28,
        hyperparameters=(hp.lr(1.0), hp.Hyperparameter("rho", 0.9, _check_rho), hp.eps(1e-6),
                         hp.weight_decay(), hp.maximize()),
        bench=dict(lr=1.0), check=dict(lr=1.0))

    @staticmethod
    def buffers(group, host):
        return {"square_avg": 0.0, "acc_delta": 0.0}

    @staticmethod
    def scalars(group, step, fresh, host):
        rho = group["rho"]
        return rules.AdadeltaScalars.of(lr=group["lr"], rho=rho,
                                     one_minus_rho=1.0 - rho, eps=group["eps"])
