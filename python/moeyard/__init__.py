"""moeyard: Mixture-of-Experts kernels for PyTorch.

Importing moeyard loads its compiled library, which registers the ``torch.ops.moeyard`` ops; the
typed Python wrappers, fake kernels and autograd formulas are in :mod:`moeyard.ops`; the
``nn.Module`` layers built on them in :mod:`moeyard.layers` (with :mod:`moeyard.routers`,
:mod:`moeyard.experts`), the training-time helpers in :mod:`moeyard.balance` and the routing
recorder in :mod:`moeyard.telemetry`.
"""
import json
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent


def _load_library():
    libs = sorted(_HERE.glob("_C*.so"))
    if not libs:
        raise ImportError(
            "moeyard's compiled library (_C*.so) is missing next to "
            f"{_HERE}; build it with `pip install --no-build-isolation -e .`"
        )
    torch.ops.load_library(str(libs[0]))


_load_library()

from . import ops  # noqa: E402  (registers fake kernels and autograd after the library loads)
from .ops import *  # noqa: E402,F401,F403
from .experts import *  # noqa: E402,F401,F403
from .routers import *  # noqa: E402,F401,F403
from .layers import *  # noqa: E402,F401,F403
from .balance import *  # noqa: E402,F401,F403
from .telemetry import *  # noqa: E402,F401,F403

__version__ = "0.1.0"


def build_info() -> dict:
    """How this copy of moeyard was compiled: torch version, CUDA kernels, architectures."""
    info = json.loads(torch.ops.moeyard._build_info())
    info["cuda_archs"] = info["cuda_archs"].split()
    return info
