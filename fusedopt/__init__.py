"""fusedopt: fused multi-tensor Triton optimizers, drop-in for torch.optim, with learning-rate
schedules. Triton is imported only when the kernels are used."""
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .formats import fp32_state_dict
from .lion import Lion
from .radam import RAdam
from .rmsprop import RMSprop
from .sgd import SGD

__version__ = "0.1.0"
__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "RAdam", "Lion", "fp32_state_dict"]


def __getattr__(name):
    # Lazy subpackages: `fusedopt.kernels` needs triton, `fusedopt.schedules` does not.
    if name in ("kernels", "schedules", "reference", "registry"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
