"""chaintune: fine-tune diffusion models along the denoising chain.

Public API::

    import chaintune
    model = chaintune.load("builtin:digits")
    traj = chaintune.sample(model, 64, steps=50, eta=1.0)
    traj.images  # [64, 1, 8, 8] in [0, 1]

The public names are imported lazily (PEP 562): ``import chaintune`` is cheap, so the CLI's ``--help``
and its input checks start without loading torch/diffusers; the first ``chaintune.load`` pays for them.
"""

from __future__ import annotations

import importlib as _importlib
import os as _os
from typing import TYPE_CHECKING

# transformers warns at import time that torchvision is absent (chaintune never needs it); keep the
# CLI's stderr to real messages unless the user asked for transformers' own verbosity.
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"

__all__ = [
    "load", "sample", "estimate_gradient", "DiffusionModel", "Conditions", "StepGrad", "Trajectory", "__version__",
]

# public name -> module that defines it
_LAZY = {
    "load": "chaintune.backends",
    "DiffusionModel": "chaintune.backends",
    "Conditions": "chaintune.backends",
    "StepGrad": "chaintune.chain",
    "Trajectory": "chaintune.chain",
    "estimate_gradient": "chaintune.gradients",
    "sample": "chaintune.sampling",
}

if TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from chaintune.backends import Conditions, DiffusionModel, load
    from chaintune.chain import StepGrad, Trajectory
    from chaintune.gradients import estimate_gradient
    from chaintune.sampling import sample


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'chaintune' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
