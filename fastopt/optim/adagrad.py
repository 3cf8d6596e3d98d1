from ..kernels import rules
from . import spec as hp
from .optimizer import Optimizer


class Adagrad(Optimizer):
    r"""Adagrad; torch.optim.Adagrad.

    .. math::
        g_t &\leftarrow \pm\nabla f(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        \tilde\gamma_t &\leftarrow \gamma / (1 + (t - 1)\,\eta) \\
        s_t &\leftarrow s_{t-1} + g_t^2 \\
        \theta_t &\leftarrow \theta_{t-1} - \tilde\gamma_t\,g_t / (\sqrt{s_t} + \epsilon)

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ), lr_decay (η), weight_decay (λ), initial_accumulator_value (s₀), eps (ε),
        maximize: as in torch.optim.Adagrad, with the same defaults.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``sum`` (4 bytes per parameter), starting at ``initial_accumulator_value``.

    References:
        Duchi, Hazan & Singer, 2011, "Adaptive Subgradient Methods for Online Learning
        and Stochastic Optimization".
    """

    spec = hp.Spec(
        rule="adagrad", torch="Adagrad", moves=20,
        hyperparameters=(hp.lr(1e-2), hp.nonnegative("lr_decay", 0.0), hp.weight_decay(),
                         hp.nonnegative("initial_accumulator_value", 0.0,
                                        "initial_accumulator_value value"),
                         hp.eps(1e-10), hp.maximize()),
        bench=dict(lr=1e-2), check=dict(lr=0.5))

    @staticmethod
    def buffers(group, host):
        return {"sum": group["initial_accumulator_value"]}

    @staticmethod
    def scalars(group, step, fresh, host):
        clr = group["lr"] / (1.0 + (step - 1) * group["lr_decay"])
        return rules.AdagradScalars.of(clr=clr, eps=group["eps"])
