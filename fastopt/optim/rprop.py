from ..kernels import rules
from . import spec as hp
from .checks import real
from .optimizer import Optimizer


def _pair(name, pair):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a pair, got {pair!r}")
    return [real(f"{name}[{i}]", value) for i, value in enumerate(pair)]


def _check_etas(etas):
    etaminus, etaplus = _pair("etas", etas)
    if not 0.0 < etaminus < 1.0 < etaplus:
        raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]} "
                         "(expected 0 < etas[0] < 1 < etas[1])")


def _check_step_sizes(step_sizes):
    smallest, largest = _pair("step_sizes", step_sizes)
    if not 0.0 <= smallest <= largest:
        raise ValueError(f"Invalid step_sizes: {step_sizes[0]}, {step_sizes[1]} "
                         "(expected 0 <= step_sizes[0] <= step_sizes[1])")


class Rprop(Optimizer):
    r"""Resilient backpropagation; torch.optim.Rprop.

    Each parameter has its own step size, which grows while its gradient keeps its sign
    and shrinks when the sign flips; only the gradient's sign moves the parameter:

    .. math::
        s_t &\leftarrow \operatorname{sign}(g_t\,g_{t-1}), \qquad
        \eta_t \leftarrow \operatorname{clamp}\bigl(\eta_{t-1}\cdot
            \{\eta_+ \text{ if } s_t > 0;\ \eta_- \text{ if } s_t < 0;\ 1\},\
            \Gamma_{\min}, \Gamma_{\max}\bigr) \\
        g_t &\leftarrow 0 \text{ where } s_t < 0, \qquad
        \theta_t \leftarrow \theta_{t-1} - \operatorname{sign}(g_t)\,\eta_t

    with :math:`\eta_0 = \gamma` (``lr``) and :math:`g_0 = 0`. As in torch, where
    ``sign(NaN) = 0``, a NaN gradient leaves its parameter and step size unchanged.
    Rprop is a full-batch
    method: mini-batch noise flips the signs and shrinks every step size.

    Args:
        params: a dict, list or tuple of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt`, or a list of parameter-group dicts.
        lr (γ, the initial step size), etas (η₋, η₊), step_sizes (Γmin, Γmax),
        maximize: as in torch.optim.Rprop, with the same defaults.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`.

    State: ``prev`` (the last gradient, zeroed where its sign flipped) and
    ``step_size``, 8 bytes per parameter; a step moves 28 bytes per parameter. Like
    torch, a changed ``lr`` affects only buffers that start later.

    References:
        Riedmiller & Braun, 1993, "A direct adaptive method for faster backpropagation
        learning: the RPROP algorithm".
    """

    spec = hp.Spec(
        rule="rprop", torch="Rprop", moves=28, keeps_subnormals=True,
        hyperparameters=(hp.lr(1e-2), hp.Hyperparameter("etas", (0.5, 1.2), _check_etas),
                         hp.Hyperparameter("step_sizes", (1e-6, 50), _check_step_sizes),
                         hp.maximize()),
        bench=dict(lr=1e-2), check=dict(lr=0.01))

    @staticmethod
    def buffers(group, host):
        return {"prev": 0.0, "step_size": group["lr"]}

    @staticmethod
    def scalars(group, step, fresh, host):
        (etaminus, etaplus), (smallest, largest) = group["etas"], group["step_sizes"]
        return rules.RpropScalars.of(etaminus=etaminus, etaplus=etaplus,
                                  step_size_min=smallest, step_size_max=largest,
                                  zero=0.0)
