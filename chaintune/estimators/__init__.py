"""Gradient estimators: each one a plan of which chain steps get which kind of gradient.

=====================  ==============================================================
``full-backprop``      pathwise through every step (exact; memory grows with T)
``truncated-backprop`` pathwise through the last k steps (AlignProp / DRaFT-K; biased)
``refl``               one pathwise step scored on its x_0 prediction (ReFL; biased)
``reinforce``          likelihood ratio at every step with PPO clipping (DDPO)
``grpo``               group-normalised advantages, PPO clipping, KL to the reference (Flow-GRPO)
``zeroth-order``       parameter perturbation at every step (ES; black-box)
``half-order``         likelihood ratio at the end of pathwise spans of h steps
``rlr``                FO on step 1 + HO span of h steps + ZO elsewhere (paper eq. 6)
``rlr-released``       the authors' released variant: FO on step 1 + ``chain_len`` (PPO-clipped) LR steps
=====================  ==============================================================

Options and their defaults: :mod:`chaintune.estimators.options` (torch-free); estimators by name:
:mod:`chaintune.estimators.registry`.
"""

from chaintune._exports import lazy
from chaintune.estimators.options import DEFAULTS, EstimatorConfig

_EXPORTS = {
    "Estimator": "chaintune.estimators.base",
    "EstimationContext": "chaintune.estimators.base",
    "Stats": "chaintune.estimators.base",
    "advantages": "chaintune.estimators.base",
    "FullBackprop": "chaintune.estimators.full",
    "TruncatedBackprop": "chaintune.estimators.truncated",
    "AlignProp": "chaintune.estimators.truncated",
    "ReFL": "chaintune.estimators.truncated",
    "Reinforce": "chaintune.estimators.reinforce",
    "GRPO": "chaintune.estimators.grpo",
    "ZerothOrder": "chaintune.estimators.zeroth",
    "HalfOrder": "chaintune.estimators.half_order",
    "RLR": "chaintune.estimators.rlr",
    "RLRReleased": "chaintune.estimators.rlr",
    "ESTIMATORS": "chaintune.estimators.registry",
    "get_estimator": "chaintune.estimators.registry",
    "estimator_from_config": "chaintune.estimators.registry"
}
__all__ = ["DEFAULTS", "EstimatorConfig", *_EXPORTS]
__getattr__ = lazy(__name__, _EXPORTS)
