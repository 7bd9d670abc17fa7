"""Estimators by name: what ``--estimator``, config files and ``chaintune.estimate_gradient(..., "rlr")`` resolve."""

from __future__ import annotations

import warnings
from dataclasses import fields

from chaintune.errors import ChaintuneError, unknown_name
from chaintune.estimators.base import Estimator
from chaintune.estimators.dpo import OnlineDPO
from chaintune.estimators.full import FullBackprop
from chaintune.estimators.grpo import GRPO
from chaintune.estimators.half_order import HalfOrder
from chaintune.estimators.nft import DiffusionNFT
from chaintune.estimators.options import DEFAULTS, EstimatorConfig
from chaintune.estimators.reinforce import Reinforce
from chaintune.estimators.rlr import RLR, RLRReleased
from chaintune.estimators.truncated import AlignProp, ReFL, TruncatedBackprop
from chaintune.estimators.zeroth import ZerothOrder

ESTIMATORS = {
    "full-backprop": FullBackprop,
    "truncated-backprop": TruncatedBackprop,
    "alignprop": AlignProp,
    "refl": ReFL,
    "reinforce": Reinforce,
    "ddpo": Reinforce,
    "grpo": GRPO,
    "zeroth-order": ZerothOrder,
    "half-order": HalfOrder,
    "rlr": RLR,
    "rlr-released": RLRReleased,
    "nft": DiffusionNFT,
    "dpo": OnlineDPO,
}


def get_estimator(name: str | Estimator, **kwargs) -> Estimator:
    """An estimator by name with keyword options (unknown options raise one clear error). Options not given take
    their defaults from :data:`chaintune.estimators.options.DEFAULTS`: the same estimator as ``chaintune align
    --estimator NAME`` builds."""
    if isinstance(name, Estimator):
        return name
    if name not in ESTIMATORS:
        raise unknown_name("estimator", name, ESTIMATORS)
    try:
        return ESTIMATORS[name](**kwargs)
    except TypeError as e:
        raise ChaintuneError(f"estimator {name!r}: {e}") from e


def estimator_from_config(cfg) -> Estimator:
    """The estimator an :class:`~chaintune.estimators.options.EstimatorConfig` (or a config with an ``estimator``
    section, ``AlignConfig``) names, given the options it declares (``Estimator.options``); a changed option the
    estimator does not take gets a warning, and the estimator validates its own."""
    est = cfg if isinstance(cfg, EstimatorConfig) else cfg.estimator
    cls = ESTIMATORS.get(est.name)
    if cls is None:
        return get_estimator(est.name)  # unknown name: one error with a did-you-mean
    changed = [f.name for f in fields(est) if f.name not in ("name", "baseline")
               and getattr(est, f.name) != getattr(DEFAULTS, f.name)]
    ignored = sorted(k for k in changed if k not in cls.options)
    if ignored:
        warnings.warn(f"estimator {est.name!r} does not use {', '.join(ignored)} (it takes: "
                      f"{', '.join(cls.options) or 'no options'})", UserWarning, stacklevel=2)
    try:
        return cls(**{k: getattr(est, k) for k in cls.options})
    except ValueError as e:
        raise ChaintuneError(f"estimator {est.name!r}: {e}") from e
