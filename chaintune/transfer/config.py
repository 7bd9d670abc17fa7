"""``TransferConfig``: every option of a transfer run (Diff-Tuning or plain fine-tuning). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chaintune.errors import ChaintuneError
from chaintune.options import option, section
from chaintune.run.config import EvalConfig, OptimConfig, PilotConfig, RunConfig

METHODS = ("diff-tuning", "plain")
TIMESTEP_MODES = ("sampling", "weighting")
# Measured (docs/results.md, "Transfer"): on an unconditional base, Diff-Tuning beat plain fine-tuning at 1-2 shots
# per class (8/8 seeds at 2), tied at 5 and lost from 10 on; the warning fires above that few-shot regime.
FEW_SHOT_RETENTION_WINS = 2
UNCONDITIONAL_RETENTION = (
    "Diff-Tuning's retention term trains the knowledge bank on the null branch of a conditional model; this model "
    "is unconditional, so bank and target share its only branch and retention pulls samples towards the source "
    "domain. With {shots:.0f} target images per class: in our benchmarks retention helped at 1-2 shots per class, "
    "tied at 5 and hurt from 10 (docs/results.md, 'Transfer'). Consider --method plain, --lambda 0 (psi only) or "
    "a class-conditional base.")


@dataclass
class BankConfig:
    """How the knowledge bank (samples of the pretrained model) is drawn and where it is cached."""

    size: int = option(1000, "Knowledge-bank samples (generated once, cached and reused).", min=1)
    steps: int = option(50, "Sampling steps of the bank's chain.", min=2)
    eta: float = option(1.0, "DDIM eta of the bank's chain.", min=0)
    scheduler: str = option("ddim", "Bank sampler: ddim | ddpm.", choices=("ddim", "ddpm", "flow"))
    guidance_scale: float | None = option(None, "CFG scale of bank samples (None: the model's default).", min=0)
    labels: str | list[int] = option("random", "Bank classes: random | null (the unconditional branch) | ids like "
                                     "0,1,2 (class-conditional models).")
    prompts: list[str] = option(factory=lambda: [""], help="Bank prompts, cycled (text models; default: empty).")
    seed: int = option(0, "Seed of the bank's samples.", min=0)
    batch_size: int = option(250, "Bank samples per forward pass.", min=1)
    dir: str | None = option(None, "Bank cache folder (default: $CHAINTUNE_CACHE/banks, else "
                             "~/.cache/chaintune/banks).")


@dataclass
class DiffTuningConfig:
    """Diff-Tuning's objective (defaults as the authors' code)."""

    # > -1: a falling law is allowed (the pilot may derive one from the chain of forgetting, forgetting.derive_schedule)
    alpha: float = option(1.0, "psi(t) ∝ (t + 1)^alpha: the target's timestep law (more weight on large t; a "
                          "negative alpha, on small t).", gt=-1)
    beta: float = option(1.0, "xi(t) ∝ (T - t)^beta: the bank's timestep law (more weight on small t; a negative "
                         "beta, on large t).", gt=-1)
    lam: float = option(0.1, "Weight of the retention loss (0: no bank, only the psi timestep law).", min=0,
                        flags=("--lambda",))
    bank_share: float = option(0.2, "Share of each batch drawn from the knowledge bank (0: no bank).", min=0)
    timestep_mode: str = option("sampling", "sampling (importance-sample t) | weighting (uniform t, weighted "
                                "losses).", choices=TIMESTEP_MODES)
    label_dropout: float = option(0.1, "Share of target labels/prompts replaced by the null condition (keeps "
                                  "CFG working).", min=0, max=1)
    prompt: str = option("", "Prompt template for target images of text models ({label}: the class name).")


@dataclass
class TransferEvalConfig(EvalConfig):
    eval_data: str | None = option("auto", "Held-out images for FID/KID (auto: the test split of a built-in "
                                   "dataset; none for a folder).")
    feature: str | None = option("auto", "FID features: digits-cnn | digits-mlp | inception:/path/to/weights "
                                 "(auto: digits-cnn for digit data).")
    sample_steps: int = option(50, "Sampling steps of evaluation samples.", min=2)
    sample_eta: float = option(1.0, "DDIM eta of evaluation samples.", min=0)
    sample_guidance: float | None = option(None, "CFG scale of evaluation samples (None: the model's default).",
                                           min=0)
    grid_samples: int = option(64, "Samples in each saved grid.", min=1)


@dataclass
class TransferPilotConfig(PilotConfig):
    """The pilot of ``transfer``: (method, LR) probes judged by FID against held-out images."""

    pilot_methods: str = option("diff-tuning,plain", "Methods the pilot probes (comma-separated).")
    # Off by default, measured (benchmarks/transfer.py --variant derived:schedule=forgetting, 3 seeds, 10 shots,
    # docs/results.md "A schedule from the chain of forgetting"): the derived laws (alpha ~ -0.74, beta ~ -0.37,
    # lambda ~ 0.144 on both benchmarks) lost to alpha = beta = 1 on FID: 2.850 vs 2.654 on conditional classes 0-4 ->
    # 5-9 (best KID there, 0.0146 vs 0.0194), 3.545 vs 2.697 on glyphs -> digits; an extra probe buys nothing there
    pilot_schedule: bool = option(False, "With both methods probed: derive Diff-Tuning's alpha, beta and lambda from "
                                  "the chain of forgetting of the best plain probe (where, along the chain, it gains "
                                  "on the held-out images) and probe Diff-Tuning with them at its best LR as well.")

    def methods(self) -> list[str]:
        names = [v.strip() for v in self.pilot_methods.split(",") if v.strip()]
        bad = [m for m in names if m not in METHODS]
        if not names or bad:
            raise ChaintuneError(f"--pilot-methods takes {', '.join(METHODS)} (comma-separated), got "
                                 f"{self.pilot_methods!r}")
        return names


@dataclass
class TransferConfig:
    """Every option of ``chaintune transfer`` (CLI flags and config-file keys share these names)."""

    # names of the previous, flat TransferConfig -> today's (old config.yaml files and scripts keep working)
    ALIASES = {"bank_guidance": "bank_guidance_scale", "grad_clip": "max_grad_norm",
               "checkpoint_every": "save_every"}

    model: str = option("builtin:glyphs", "Base model id (builtin:glyphs, a diffusers dir, a run dir).")
    data: str = option("digits-fewshot:10", "Target data: digits-fewshot:K, digits:train, glyphs:train, "
                       "digits-AtoB, or a folder of images. Video models: moving-digits:train, or a folder of clips "
                       "(GIF/WebP/APNG/.npy; prompt in NAME.txt beside each clip).")
    method: str = option("diff-tuning", "diff-tuning | plain.", choices=METHODS)
    diff_tuning: DiffTuningConfig = section(DiffTuningConfig)
    bank: BankConfig = section(BankConfig, prefix="bank_")
    optim: OptimConfig = section(OptimConfig, steps=1000, lr=1e-4, ema_decay=0.999, gradient_checkpointing=False)
    pilot: TransferPilotConfig = section(TransferPilotConfig)
    eval: TransferEvalConfig = section(TransferEvalConfig, eval_every=0, eval_samples=500)
    run: RunConfig = section(RunConfig, out="runs/transfer", log_every=10, save_every=0)

    def validate(self) -> None:
        """Cross-field rules (each option's own type and range are checked by chaintune.options.check)."""
        from chaintune.options import check

        check(self)
        dt = self.diff_tuning
        if dt.bank_share >= 1.0:
            raise ChaintuneError(f"bank_share must be in [0, 1), got {dt.bank_share}")
        if self.retains() and self.bank_batch() == 0:
            raise ChaintuneError(f"batch_size {self.optim.batch_size} with bank_share {dt.bank_share} leaves no "
                                 "bank samples per batch; raise one of them (or set bank_share 0 for no retention)")
        if self.pilot.pilot:
            from chaintune.run.pilot import parse_lrs

            parse_lrs(self.pilot.pilot_lrs)
            self.pilot.methods()
        labels = self.bank.labels
        if isinstance(labels, str) and labels not in ("random", "null"):
            try:
                self.bank.labels = [int(x) for x in labels.split(",")]
            except ValueError:
                raise ChaintuneError(f"bank labels must be random, null or class ids like 0,1,2; "
                                     f"got {labels!r}") from None

    def retains(self) -> bool:
        """Whether the retention term is on (Diff-Tuning with lam > 0 and bank_share > 0). Without it,
        Diff-Tuning is the psi timestep law on the target alone: no bank is built or trained on."""
        return self.method == "diff-tuning" and self.diff_tuning.lam > 0 and self.diff_tuning.bank_share > 0

    def bank_batch(self) -> int:
        """Bank samples per batch (0 without retention): ``int(B * bank_share)``, truncated as the official code's
        ``int(batch_size * lwf_ratio)`` (B = 8 at 0.2: 1, not 2); at least one target sample remains."""
        if not self.retains():
            return 0
        n = self.optim.batch_size
        return min(n - 1, int(n * self.diff_tuning.bank_share))

    @classmethod
    def from_dict(cls, values: dict) -> TransferConfig:
        from chaintune.options import from_dict

        return from_dict(cls, values, "transfer option")

    @classmethod
    def from_run(cls, run_dir: str | Path) -> TransferConfig | None:
        """The config a ``transfer`` run directory was made with (its ``config.yaml``), or None."""
        import yaml

        path = Path(run_dir) / "config.yaml"
        if not path.is_file():
            return None
        values = yaml.safe_load(path.read_text()) or {}
        return cls.from_dict(values) if isinstance(values, dict) else None
