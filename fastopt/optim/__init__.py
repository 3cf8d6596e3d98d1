"""The optimizers, one module per algorithm family, on the base in ``optimizer``.

Each algorithm class declares its :class:`~fastopt.optim.spec.Spec`, which lists it in
:data:`ALGORITHMS`; the imports below define them in the order every listing shows
them: torch.optim's namesakes first, then the algorithms from papers.
"""

# isort: off
from .sgd import SGD
from .adagrad import Adagrad
from .rmsprop import RMSprop
from .adadelta import Adadelta
from .adam import Adam, AdamW
from .adamax import Adamax
from .nadam import NAdam
from .radam import RAdam
from .rprop import Rprop
from .asgd import ASGD
from .adafactor import Adafactor
from .swats import SWATS
from .lion import Lion
from .adan import Adan
from .layerwise import LAMB, LARS
# isort: on
from .optimizer import Optimizer
from .spec import ALGORITHMS

__all__ = ["ALGORITHMS", "ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax",
           "Adan", "LAMB", "LARS", "Lion", "NAdam", "Optimizer", "RAdam", "RMSprop", "Rprop",
           "SGD", "SWATS"]
