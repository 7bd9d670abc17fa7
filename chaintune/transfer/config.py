"""``TransferConfig``: every option of a transfer run (Diff-Tuning or plain fine-tuning)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chaintune.errors import ChaintuneError
from chaintune.transfer.bank import BankConfig

METHODS = ("diff-tuning", "plain")
UNCONDITIONAL_RETENTION = (
    "Diff-Tuning's retention term trains the knowledge bank on the null branch of a conditional model; this model "
    "is unconditional, so bank and target share its only branch and retention pulls samples towards the source "
    "domain (README, 'Transfer'); in our benchmarks that helps only with 1-2 shots per class. Prefer a "
    "class-conditional base, or --method plain.")
TIMESTEP_MODES = ("sampling", "weighting")


@dataclass
class TransferConfig:
    """Everything a transfer run depends on (written to the run directory as its config)."""

    model: str = "builtin:glyphs"
    data: str = "digits-fewshot:10"
    method: str = "diff-tuning"
    peft: str = "none"
    lora_rank: int = 4
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # Diff-Tuning (defaults as the official code)
    alpha: float = 1.0
    beta: float = 1.0
    lam: float = 0.1
    bank_share: float = 0.2
    timestep_mode: str = "sampling"
    # knowledge bank
    bank_size: int = 1000
    bank_steps: int = 50
    bank_eta: float = 1.0
    bank_scheduler: str = "ddim"
    bank_guidance: float | None = None
    bank_labels: str | list[int] = "random"
    bank_seed: int = 0
    bank_dir: str | None = None
    # conditioning of target images
    label_dropout: float = 0.1
    prompt: str = ""
    # evaluation and logging
    eval_data: str | None = "auto"
    feature: str = "auto"
    eval_every: int = 0
    eval_samples: int = 500
    sample_steps: int = 50
    sample_eta: float = 1.0
    sample_guidance: float | None = None  # CFG scale of evaluation samples (None: the model's default)
    grid_samples: int = 64
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    device: str | None = None

    def validate(self) -> None:
        from chaintune.training.adapters import PEFT_METHODS

        if self.method not in METHODS:
            from chaintune.errors import unknown_name

            raise unknown_name("transfer method", self.method, METHODS)
        if self.peft not in PEFT_METHODS:
            from chaintune.errors import unknown_name

            raise unknown_name("peft method", self.peft, PEFT_METHODS)
        if self.timestep_mode not in TIMESTEP_MODES:
            from chaintune.errors import unknown_name

            raise unknown_name("timestep mode", self.timestep_mode, TIMESTEP_MODES)
        if self.steps < 1 or self.batch_size < 1:
            raise ChaintuneError("steps and batch_size must be >= 1")
        if not 0.0 <= self.bank_share < 1.0:
            raise ChaintuneError(f"bank_share must be in [0, 1), got {self.bank_share}")
        if self.lam < 0:
            raise ChaintuneError(f"lam must be >= 0, got {self.lam}")
        if self.retains() and self.bank_batch() == 0:
            raise ChaintuneError(f"batch_size {self.batch_size} with bank_share {self.bank_share} leaves no bank "
                                 "samples per batch; raise one of them (or set bank_share 0 for no retention)")

    def retains(self) -> bool:
        """Whether the retention term is on (Diff-Tuning with lam > 0 and bank_share > 0). Without it,
        Diff-Tuning is the psi timestep law on the target alone: no bank is built or trained on."""
        return self.method == "diff-tuning" and self.lam > 0 and self.bank_share > 0

    def bank_batch(self) -> int:
        """Bank samples per batch (0 without retention); at least one target sample remains."""
        if not self.retains():
            return 0
        return min(self.batch_size - 1, int(round(self.batch_size * self.bank_share)))

    def bank_config(self) -> BankConfig:
        labels = self.bank_labels
        if isinstance(labels, str) and labels not in ("random", "null"):
            try:
                labels = [int(x) for x in labels.split(",")]
            except ValueError:
                msg = f"bank labels must be random, null or class ids like 0,1,2; got {labels!r}"
                raise ChaintuneError(msg) from None
        return BankConfig(size=self.bank_size, steps=self.bank_steps, eta=self.bank_eta,
                          scheduler=self.bank_scheduler, guidance_scale=self.bank_guidance, labels=labels,
                          seed=self.bank_seed)

    @classmethod
    def from_dict(cls, values: dict) -> TransferConfig:
        from chaintune.utils.io import strict_config

        return strict_config(cls, values, "transfer option")

    @classmethod
    def from_run(cls, run_dir: str | Path) -> TransferConfig | None:
        """The config a ``transfer`` run directory was made with (its ``config.yaml``), or None."""
        import yaml

        path = Path(run_dir) / "config.yaml"
        if not path.is_file():
            return None
        values = yaml.safe_load(path.read_text()) or {}
        return cls.from_dict(values) if isinstance(values, dict) else None
