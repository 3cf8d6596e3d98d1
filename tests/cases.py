"""The option matrix every algorithm is tested through: each flag on and off, a non-zero
weight decay, and combinations. The learning rates are larger than the defaults so
that 30 steps move the parameters far enough for a wrong formula to show."""

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
    ],
    "AdamW": [
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.0),
        dict(lr=0.01, amsgrad=True, weight_decay=0.2),
        dict(lr=0.01, maximize=True, bias_correction=False),
        dict(lr=0.01, maximize=True, weight_decay=0.3),
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
}

ALL = [(name, kwargs) for name, cases in CASES.items() for kwargs in cases]


def case_id(case):
    name, kwargs = case
    return name + "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
