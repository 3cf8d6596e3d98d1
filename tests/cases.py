"""The option matrix every algorithm is tested through: each flag on and off, a non-zero
weight decay, and combinations. The learning rates are larger than the defaults so
that 30 steps move the parameters far enough for a wrong formula to show."""

import fastopt

CASES = {
    "SGD": [
        dict(lr=0.01),
        dict(lr=0.01, momentum=0.9),
        dict(lr=0.01, momentum=0.9, dampening=0.5),
        dict(lr=0.01, momentum=0.9, nesterov=True),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, maximize=True),
        dict(lr=0.01, momentum=0.8, dampening=0.3, weight_decay=0.05, maximize=True),
        dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.05),
    ],
    "Adagrad": [
        dict(lr=0.05),
        dict(lr=0.05, lr_decay=0.01),
        dict(lr=0.05, weight_decay=0.1),
        dict(lr=0.05, initial_accumulator_value=0.1),
        dict(lr=0.05, eps=1e-3, maximize=True),
        dict(lr=0.05, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.5,
             maximize=True),
    ],
    "RMSprop": [
        dict(lr=0.01),
        dict(lr=0.01, centered=True),
        dict(lr=0.01, momentum=0.9),
        dict(lr=0.01, momentum=0.9, centered=True),
        dict(lr=0.01, weight_decay=0.1, alpha=0.9),
        dict(lr=0.01, maximize=True, eps=1e-4),
        dict(lr=0.01, momentum=0.5, centered=True, weight_decay=0.1, maximize=True),
    ],
    "Adadelta": [
        dict(),
        dict(lr=0.5, rho=0.5),
        dict(weight_decay=0.1),
        dict(maximize=True, eps=1e-4),
        dict(lr=2.0, rho=0.95, weight_decay=0.05, maximize=True),
    ],
    "Adam": [
        dict(lr=0.01),
        dict(lr=0.01, amsgrad=True),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        dict(lr=0.01, maximize=True),
        dict(lr=0.01, bias_correction=False),
        dict(lr=0.01, betas=(0.8, 0.99), eps=1e-3),
        dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True, bias_correction=False),
        dict(lr=0.01, caution=True),
        dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True, caution=True),
    ],
    "AdamW": [
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.0),
        dict(lr=0.01, amsgrad=True, weight_decay=0.2),
        dict(lr=0.01, maximize=True, bias_correction=False),
        dict(lr=0.01, maximize=True, weight_decay=0.3),
        dict(lr=0.01, weight_decay=0.1, caution=True),
    ],
    "Adamax": [
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, maximize=True, betas=(0.8, 0.99)),
        dict(lr=0.01, eps=1e-2, weight_decay=0.05, maximize=True),
    ],
    "NAdam": [
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.01, momentum_decay=0.1),
        dict(lr=0.01, maximize=True, betas=(0.8, 0.99)),
        dict(lr=0.01, maximize=True, weight_decay=0.1),
        dict(lr=0.01, maximize=True, weight_decay=0.1, decoupled_weight_decay=True),
    ],
    "RAdam": [
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3),  # rectified from step 3
        dict(lr=0.01, maximize=True, weight_decay=0.1),
        dict(lr=0.01, maximize=True, weight_decay=0.1, decoupled_weight_decay=True,
             betas=(0.5, 0.8)),
    ],
    "Rprop": [
        dict(lr=0.01),
        dict(lr=0.05, etas=(0.3, 1.5)),
        dict(lr=0.01, step_sizes=(1e-3, 0.02)),  # both bounds reached
        dict(lr=0.01, maximize=True, etas=(0.6, 1.1), step_sizes=(1e-4, 1.0)),
    ],
    "ASGD": [
        dict(lr=0.05),
        dict(lr=0.05, t0=5),  # averaging from step 7
        dict(lr=0.05, lambd=0.1, alpha=0.5, t0=0),
        dict(lr=0.05, weight_decay=0.1, t0=10),
        dict(lr=0.05, maximize=True, lambd=0.01, t0=3, weight_decay=0.05),
    ],
    "Adafactor": [
        dict(),
        dict(lr=0.05, weight_decay=0.1),
        dict(lr=0.05, d=1.5, beta2_decay=-0.5),
        dict(lr=0.5, eps=(1e-20, 1e-1)),  # lr above 1/sqrt(t): the relative step rules
        dict(lr=0.05, maximize=True, weight_decay=0.05, eps=(1e-3, 1e-3)),
    ],
    # From papers, not in torch.optim: tested against the papers' formulas only.
    "SWATS": [  # the switch to SGD, which these do not reach, is tested in test_swats.py
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3),
        dict(lr=0.01, maximize=True, weight_decay=0.05),
    ],
    "Lion": [
        dict(lr=0.01),
        dict(lr=0.01, betas=(0.5, 0.8)),
        dict(lr=0.01, weight_decay=0.5),
        dict(lr=0.01, maximize=True, weight_decay=0.5, betas=(0.95, 0.98)),
        dict(lr=0.01, weight_decay=0.5, caution=True),
    ],
    "Adan": [
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, weight_decay=0.1, no_prox=True),
        dict(lr=0.01, betas=(0.9, 0.8, 0.95), eps=1e-3),
        dict(lr=0.01, maximize=True, weight_decay=0.05),
        dict(lr=0.01, weight_decay=0.1, caution=True),
        dict(lr=0.01, weight_decay=0.1, no_prox=True, caution=True, maximize=True),
    ],
    "LAMB": [
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3),
        dict(lr=0.01, maximize=True, weight_decay=0.05),
    ],
    "LARS": [
        dict(lr=1.0),
        dict(lr=1.0, momentum=0.0),
        dict(lr=2.0, weight_decay=0.01, trust_coefficient=0.01),
        dict(lr=1.0, maximize=True, momentum=0.5, weight_decay=0.05),
    ],
}

# Per-tensor algorithms: their references take the tensors' shapes.
LAYERWISE = {name for name, algorithm in fastopt.optim.ALGORITHMS.items()
             if algorithm.spec.per_tensor}

NOT_IN_TORCH = {name for name, algorithm in fastopt.optim.ALGORITHMS.items()
                if algorithm.spec.torch is None}

ALL = [(name, kwargs) for name, cases in CASES.items() for kwargs in cases]

# Options of fastopt's own, which torch.optim's classes lack.
FASTOPT_OPTIONS = {"bias_correction", "caution"}

TORCH_CASES = [(name, kwargs) for name, kwargs in ALL
               if name not in NOT_IN_TORCH and not FASTOPT_OPTIONS & set(kwargs)]


def case_id(case):
    name, kwargs = case
    return name + "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
