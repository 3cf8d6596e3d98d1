import numpy as np

from ..kernels import rules
from . import spec as hp
from .optimizer import Optimizer


class ASGD(Optimizer):
    r"""Averaged stochastic gradient descent; torch.optim.ASGD.

    .. math::
        g_t &\leftarrow \pm\nabla f(\theta_{t-1}) + \lambda_{wd}\,\theta_{t-1} \\
        \theta_t &\leftarrow (1 - \lambda\,\eta_t)\,\theta_{t-1} - \eta_t\,g_t \\
        \bar\theta_t &\leftarrow \begin{cases} \theta_t & \mu_t = 1 \\
            \bar\theta_{t-1} + \mu_t\,(\theta_t - \bar\theta_{t-1}) & \text{otherwise}
            \end{cases} \\
        \eta_{t+1} &= \frac{\gamma}{(1 + \lambda\gamma t)^\alpha}, \qquad
        \mu_{t+1} = \frac{1}{\max(1, t - t_0)}

    with :math:`\eta_1 = \gamma` and :math:`\mu_1 = 1`. The average
    :math:`\bar\theta` (``state["ax"]``) is the last iterate until :math:`t_0` steps
    have passed, and the Polyak-Ruppert average of the iterates after that: evaluate
    with it, e.g. by copying it into the model. :math:`\eta` and :math:`\mu` are
    computed on the host and kept per group in ``state["eta"]`` and ``state["mu"]``,
    rounded to float32 as torch keeps them.

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ), lambd (λ), alpha (α), t0 (t₀), weight_decay (λ_wd, an L2 penalty),
        maximize: as in torch.optim.ASGD, with the same defaults.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``ax``, 4 bytes per parameter; a step moves 20 bytes per parameter.

    References:
        Polyak & Juditsky, 1992, "Acceleration of Stochastic Approximation by
        Averaging".
    """

    # eta None: the group's lr at its first step.
    spec = hp.Spec(
        rule="asgd", torch="ASGD", moves=20, host={"eta": None, "mu": 1.0},
        hyperparameters=(hp.lr(1e-2), hp.nonnegative("lambd", 1e-4), hp.number("alpha", 0.75),
                         hp.number("t0", 1e6), hp.weight_decay(), hp.maximize()),
        bench=dict(lr=1e-2), check=dict(lr=0.2))

    @staticmethod
    def buffers(group, host):
        return {"ax": 0.0}

    @staticmethod
    def scalars(group, step, fresh, host):
        eta = group["lr"] if host["eta"] is None else host["eta"]
        eta = float(np.float32(eta))
        return rules.ASGDScalars.of(decay=1.0 - group["lambd"] * eta, eta=eta,
                                 mu=host["mu"], averaging=host["mu"] != 1.0)

    @staticmethod
    def host_after(group, step, host):
        lr, lambd = group["lr"], group["lambd"]
        eta = lr / (1.0 + lambd * lr * step) ** group["alpha"]
        mu = 1.0 / max(1.0, step - group["t0"])
        return {"eta": float(np.float32(eta)), "mu": float(np.float32(mu))}
