"""Transfer fine-tuning: Diff-Tuning (chain of forgetting), its knowledge bank, and the analysis.

See :func:`chaintune.transfer.transfer` (the trainer), :func:`build_bank` (cached samples of the
pretrained model) and :func:`chaintune.transfer.forgetting.analyze` (per-timestep forgetting).
"""

from chaintune.transfer.bank import BankConfig, KnowledgeBank, build_bank
from chaintune.transfer.config import METHODS, TransferConfig
from chaintune.transfer.loss import diff_tuning_loss
from chaintune.transfer.timesteps import importance_weights, sample_timesteps, timestep_probs
from chaintune.transfer.trainer import TransferResult, transfer

__all__ = ["BankConfig", "KnowledgeBank", "build_bank", "TransferConfig", "TransferResult", "transfer",
           "diff_tuning_loss", "METHODS", "sample_timesteps", "timestep_probs", "importance_weights"]
