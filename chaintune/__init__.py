"""chaintune: fine-tune diffusion models along the denoising chain.

Public API::

    import chaintune
    model = chaintune.load("builtin:digits")
    traj = chaintune.sample(model, 64, steps=50, eta=1.0)
    traj.images  # [64, 1, 8, 8] in [0, 1]
"""

import os as _os

# transformers warns at import time that torchvision is absent (chaintune never needs it); keep the
# CLI's stderr to real messages unless the user asked for transformers' own verbosity.
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from chaintune.backends import Conditions, DiffusionModel, load
from chaintune.chain import StepGrad, Trajectory
from chaintune.gradients import estimate_gradient
from chaintune.sampling import sample

__version__ = "0.1.0"

__all__ = [
    "load", "sample", "estimate_gradient", "DiffusionModel", "Conditions", "StepGrad", "Trajectory", "__version__",
]
