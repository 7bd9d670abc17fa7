"""Reward alignment: ``align(AlignConfig)`` — the objective (:mod:`~chaintune.align.objective`), its options
(:mod:`~chaintune.align.config`, torch-free), the hacking guard (:mod:`~chaintune.align.guard`) and the demo
(:mod:`~chaintune.align.demo`)."""

from chaintune._exports import lazy
from chaintune.align.config import AlignConfig, ChainConfig, EstimatorConfig, GuardConfig

__all__ = ["AlignConfig", "ChainConfig", "EstimatorConfig", "GuardConfig", "align", "align_run", "AlignObjective",
           "HackingGuard", "estimator_from_config", "kl_to_base", "retention_loss", "base_model_weights",
           "read_metrics", "run_demo", "run_video_demo"]
__getattr__ = lazy(__name__, {
    **dict.fromkeys(["align", "align_run", "AlignObjective", "estimator_from_config", "kl_to_base", "retention_loss",
                     "base_model_weights", "read_metrics"], "chaintune.align.objective"),
    "HackingGuard": "chaintune.align.guard", "run_demo": "chaintune.align.demo",
    "run_video_demo": "chaintune.align.demo"})
