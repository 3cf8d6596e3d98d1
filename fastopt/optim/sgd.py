from ..kernels import rules
from . import spec as hp
from .optimizer import Optimizer


def _check_nesterov(group):
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class SGD(Optimizer):
    r"""Stochastic gradient descent, with optional (Nesterov) momentum; torch.optim.SGD.

    .. math::
        g_t &\leftarrow \pm\nabla f(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        b_t &\leftarrow \begin{cases} g_t & t = 1 \\
                                      \mu\,b_{t-1} + (1 - \tau)\,g_t & t > 1 \end{cases} \\
        d_t &\leftarrow g_t + \mu\,b_t \text{ if nesterov else } b_t \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma\,d_t

    With ``momentum=0`` there is no buffer and :math:`d_t = g_t`.

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ), momentum (μ), dampening (τ), weight_decay (λ, an L2 penalty),
        nesterov, maximize: as in torch.optim.SGD, with the same defaults.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``momentum_buffer`` when momentum > 0 (4 bytes per parameter).

    References:
        Sutskever et al., 2013, "On the importance of initialization and momentum in
        deep learning".
    """

    spec = hp.Spec(
        averages={"momentum_buffer": hp.SIGNED},
        rule="sgd", torch="SGD", moves=20,
        hyperparameters=(hp.lr(1e-3), hp.nonnegative("momentum", 0.0),
                         hp.number("dampening", 0.0), hp.weight_decay(),
                         hp.flag("nesterov"), hp.maximize()),
        constraints=(_check_nesterov,),
        bench=dict(lr=1e-3, momentum=0.9), check=dict(lr=0.05, momentum=0.9))
    begun_afresh = ("momentum_buffer",)  # from the gradient, as torch's loaded without it

    @staticmethod
    def buffers(group, host):
        return {"momentum_buffer": 0.0} if group["momentum"] != 0 else {}

    @staticmethod
    def scalars(group, step, fresh, host):
        momentum = group["momentum"]
        # No buffer, or a new one (which torch fills with a clone): the raw gradient.
        raw_gradient = momentum == 0 or "momentum_buffer" in fresh
        grad_weight = 1.0 if raw_gradient else 1.0 - group["dampening"]
        return rules.SGDScalars.of(lr=group["lr"], momentum=momentum,
                                grad_weight=grad_weight, nesterov=bool(group["nesterov"]))
