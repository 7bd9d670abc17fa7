"""Transfer fine-tuning: Diff-Tuning (chain of forgetting), its knowledge bank, and the analysis.

See :func:`chaintune.transfer.transfer` (the trainer), :func:`build_bank` (cached samples of the
pretrained model) and :func:`chaintune.transfer.forgetting.analyze` (per-timestep forgetting).
Names load lazily, so ``chaintune.transfer.config`` (and ``chaintune --help``) stays torch-free.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BankConfig": "config", "TransferConfig": "config", "METHODS": "config",
    "KnowledgeBank": "bank", "build_bank": "bank",
    "TransferResult": "trainer", "transfer": "trainer",
    "diff_tuning_loss": "loss",
    "sample_timesteps": "timesteps", "timestep_probs": "timesteps", "importance_weights": "timesteps",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"chaintune.transfer.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'chaintune.transfer' has no attribute {name!r}")
