"""The optimizers, one module per algorithm family, on the base in ``optimizer``."""

from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .asgd import ASGD
from .layerwise import LAMB, LARS
from .lion import Lion
from .nadam import NAdam
from .optimizer import Optimizer
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .sgd import SGD
from .swats import SWATS

__all__ = ["ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LAMB",
           "LARS", "Lion", "NAdam", "Optimizer", "RAdam", "RMSprop", "Rprop", "SGD", "SWATS"]
