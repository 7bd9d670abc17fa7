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
"""

from __future__ import annotations

from chaintune.errors import ChaintuneError, unknown_name
from chaintune.estimators.base import EstimationContext, Estimator, Stats, advantages
from chaintune.estimators.full import FullBackprop
from chaintune.estimators.grpo import GRPO
from chaintune.estimators.half_order import HalfOrder
from chaintune.estimators.reinforce import Reinforce
from chaintune.estimators.rlr import RLR, RLRReleased
from chaintune.estimators.truncated import ReFL, TruncatedBackprop
from chaintune.estimators.zeroth import ZerothOrder

ESTIMATORS = {
    "full-backprop": FullBackprop,
    "truncated-backprop": TruncatedBackprop,
    "alignprop": lambda k=1, **kw: TruncatedBackprop(k=k, random_k=True, **kw),
    "refl": ReFL,
    "reinforce": Reinforce,
    "ddpo": Reinforce,
    "grpo": GRPO,
    "zeroth-order": ZerothOrder,
    "half-order": HalfOrder,
    "rlr": RLR,
    "rlr-released": RLRReleased,
}


def get_estimator(name: str | Estimator, **kwargs) -> Estimator:
    """An estimator by name with keyword options (unknown options raise one clear error)."""
    if isinstance(name, Estimator):
        return name
    if name not in ESTIMATORS:
        raise unknown_name("estimator", name, ESTIMATORS)
    try:
        return ESTIMATORS[name](**kwargs)
    except TypeError as e:
        raise ChaintuneError(f"estimator {name!r}: {e}") from e


__all__ = ["Estimator", "EstimationContext", "Stats", "advantages", "FullBackprop", "TruncatedBackprop", "ReFL",
           "Reinforce", "GRPO", "ZerothOrder", "HalfOrder", "RLR", "RLRReleased", "ESTIMATORS", "get_estimator"]
