"""``chaintune align``'s options: the chain, the estimator, the guards, evaluation and the run. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from chaintune.estimators.options import GROUPED, EstimatorConfig
from chaintune.options import option, section
from chaintune.run.config import EvalConfig, OptimConfig, PilotConfig, RunConfig


@dataclass
class ChainConfig:
    """The model and the sampling chain that alignment trains through."""

    model: str = option("builtin:digits", "Model id: builtin:NAME, a diffusers dir, a run dir or a hub id.")
    scheduler: str = option("ddim", "Chain scheduler: ddim (eta-controlled) | ddpm (flow models use their own).",
                            choices=("ddim", "ddpm", "flow"))
    sample_steps: int = option(20, "Denoising steps of the chain (T).", min=2)
    eta: float = option(1.0, "DDIM eta of the chain (> 0: stochastic transitions with exact log-probs).", min=0)
    guidance_scale: float | None = option(None, "Classifier-free guidance scale (conditional models).", min=0)
    prompts: list[str] | None = option(None, "A prompt to train on (repeatable; text models).", key="prompt")
    prompt_file: str | None = option(None, "Prompt file: .txt (one a line, # comments), .json list, or "
                                     "builtin:NAME (text models).")
    group_size: int | None = option(None, "Samples drawn per prompt (or label) in a training batch, consecutive: "
                                    "GRPO's group, the per-prompt baseline's comparison set (batch_size must be a "
                                    "multiple). Default: 4 for --estimator grpo, --baseline group, and estimators "
                                    "with likelihood-ratio terms under --baseline prompt on a model with prompts or "
                                    "labels (a sample alone in its group gets advantage 0 from group and the batch "
                                    "baseline from prompt; 4 leaves 4-8 groups in a 16-32 batch), else 1 "
                                    "(independent draws).", min=1)
    labels: list[int] | None = option(None, "A class label to train on (repeatable; class-conditional models).",
                                      key="label")
    video_shape: str | None = option(None, "Video models: sample FRAMESxHEIGHTxWIDTH pixels (e.g. 33x480x832); "
                                     "default: the size the model was saved at.")
    vae_chunk: int | None = option(None, "Decode latents through the VAE N samples at a time (less peak memory).",
                                   min=1)
    coarse_prompt: str | None = option(None, "Diffusive chain of thought: prompt for the first (coarse) stage.")
    mid_prompt: str | None = option(None, "Prompt for the middle stage of the chain.")
    fine_prompt: str | None = option(None, "Prompt for the last (fine) stage of the chain.")
    stage_boundaries: str = option("0.3333,0.6667", "Chain-position fractions b1,b2 splitting coarse/mid/fine.")
    controlnet: str | None = option(None, "Reward fine-tuning of a ControlNet: a chaintune controlnet run (or an "
                                    "align run of one, or a *ControlNetPipeline dir). Its ControlNet (or LoRA on it) "
                                    "trains, the base stays frozen, and every sample follows a control image from "
                                    "--control-data; --model is read only for a bare ControlNetModel dir.")
    control_data: str = option("auto", "With --controlnet: images whose conditions the samples follow (auto: the "
                               "ControlNet run's training data). Evaluation uses held-out ones: digits:test for "
                               "digit data, else the last 10% of these.")


@dataclass
class GuardConfig:
    """Reward-hacking guards: stay near the base model."""

    # benchmarks/defaults.py: 0 hacked (100% share at nn-distance 1.26-1.32x the base's on digit:4,7); 0.03 held
    # digit:4 at 80%; 0.01 with 4 spans at lr 1e-4: 94-95% on digit:1,7 at nn-distance <= 1.27x throughout
    kl_weight: float = option(0.01, "Weight of the closed-form KL to the base model's transitions.", min=0)
    kl_samples: int = option(4, "Samples per KL estimate.", min=1)
    retention_weight: float = option(0.0, "Weight of a denoising loss on base-model samples.", min=0)
    retention_samples: int = option(64, "Base-model samples generated for the retention loss.", min=1)
    # the hacking guard (chaintune.align.HackingGuard): its thresholds are the acceptance bounds of
    # issue 13 (samples that stay digits: nn-distance <= 1.3x the base model's) and a halving of diversity
    on_hacking: str = option("rollback", "When an evaluation shows reward hacking: off | warn | stop (keep the best "
                             "checkpoint) | rollback (back to the best checkpoint with half the LR; stop after "
                             "max_rollbacks).", choices=("off", "warn", "stop", "rollback"))
    realism_tolerance: float = option(1.3, "Hacking when the family's realism distance (nn-distance to real data "
                                      "for the built-in digits, else to the base model's samples) exceeds this "
                                      "multiple of the base model's.", gt=1)
    collapse_ratio: float = option(0.5, "Hacking when sample diversity falls below this share of the base "
                                   "model's (collapse).", gt=0, max=1)
    max_rollbacks: int = option(2, "Rollbacks before the guard stops the run.", min=0)
    # benchmarks/guard.py (the guard replayed on 39 guard-off runs of benchmarks/defaults.py, eval every 25 steps):
    # patience 1 rolled back 14 of the 32 runs that end as good digits, 2 only 6, 3 only 3; each caught all 7
    # runs that end hacked, 2 one evaluation later and 3 two (half a default run)
    hacking_patience: int = option(2, "Evaluations in a row that must show hacking before on_hacking acts (the "
                                   "first ones warn; the kept best is never an alarmed evaluation).", min=1)


@dataclass
class AlignPilotConfig(PilotConfig):
    """The pilot of ``align``: (estimator, LR) probes judged by the held-out reward; an alarmed probe is not chosen."""

    pilot_estimators: str = option("", "Estimators the pilot probes (comma-separated; default: --estimator).")

    def estimators(self, configured: str) -> list[str]:
        names = [v.strip() for v in self.pilot_estimators.split(",") if v.strip()]
        return names or [configured]


@dataclass
class AlignEvalConfig(EvalConfig):
    heldout_reward: str | None = option("auto", "Reward evaluated but never trained on (auto: the reward family's "
                                        "held-out twin, e.g. digit:K -> digit-heldout:K; '' for none).")


@dataclass
class AlignConfig:
    """Every option of ``chaintune align`` (CLI flags and config-file keys share these names)."""

    # names of the previous, flat AlignConfig -> today's (old config.yaml files keep working); None: dropped
    ALIASES = {"prompts": "prompt", "labels": "label", "extra": None}

    reward: str = option("digit:3", "Reward spec: digit:K, jpeg-compressibility, imagenet:CLASS, 0.7*a+0.3*b, "
                         "module:function (imports and RUNS that Python code).")
    chain: ChainConfig = section(ChainConfig)
    estimator: EstimatorConfig = section(EstimatorConfig)
    # benchmarks/defaults.py: the old 3e-4, constant, 100 steps hacked (22% share, nn-distance 3.1-3.5x the base's);
    # lr 1e-4 with cosine decay over 150 steps: 94-95% on digit:1,7 with no hacking alarm on the way. lr 2e-4 over
    # 100 steps ended at 83-95% (seed 0) but passed through nn-distance 1.4-1.6x at step 25 on 5 of 8 runs
    # 250 steps (session 8, "as shipped" runs, guard on): the kept model reached 86-100% on digits 0-9 (11 target/seed
    # pairs); at 150 steps digit:9 seed 0 stayed at 75-78% (74% on fresh seeds), the rest 86-97%
    optim: OptimConfig = section(OptimConfig, lr=1e-4, lr_schedule="cosine", steps=250)
    guards: GuardConfig = section(GuardConfig)
    pilot: AlignPilotConfig = section(AlignPilotConfig)
    eval: AlignEvalConfig = section(AlignEvalConfig, final_model="best")
    run: RunConfig = section(RunConfig, out="runs/align")

    @classmethod
    def from_dict(cls, values: dict) -> AlignConfig:
        from chaintune.options import from_dict

        return from_dict(cls, values, "align option")

    @property
    def group_size(self) -> int:
        """Samples per prompt/label in a training batch on a model without a prompt pool, or whatever the estimator
        (``chain.group_size``, or 4 for GRPO's groups); :meth:`group_size_for` is the whole rule."""
        return self.group_size_for(uses_baseline=False)

    def group_size_for(self, uses_baseline: bool) -> int:
        """Samples per prompt/label in a training batch: ``chain.group_size``; else 4 for GRPO and ``--baseline
        group``, and for an estimator with likelihood-ratio terms (``uses_baseline``) under ``--baseline prompt`` on
        a model that draws prompts or labels (the caller knows); else 1 (independent draws)."""
        if self.chain.group_size is not None:
            return self.chain.group_size
        if self.estimator.name in GROUPED or self.estimator.baseline == "group":
            return 4
        return 4 if uses_baseline and self.estimator.baseline == "prompt" else 1

    def validate(self) -> None:
        """Cross-field rules (each option's own type and range are checked by chaintune.options.check)."""
        from chaintune.errors import ChaintuneError
        from chaintune.options import check

        check(self)
        e = self.estimator
        if e.name in ("rlr", "half-order") and e.h >= self.chain.sample_steps:
            raise ChaintuneError(f"h={e.h} must be smaller than sample_steps={self.chain.sample_steps}")
        if e.name in ("truncated-backprop", "alignprop") and e.k > self.chain.sample_steps:
            # the plan would silently backpropagate through the whole chain instead of the k steps asked for
            raise ChaintuneError(f"k={e.k} must be at most sample_steps={self.chain.sample_steps} (the chain's steps)")
        if "," in e.j:
            try:
                a, b = (int(v) for v in e.j.split(","))
            except ValueError:
                raise ChaintuneError(f"j must be uniform, grad-norm or a,b (paper steps), got {e.j!r}") from None
            if not 2 <= a <= b <= self.chain.sample_steps:
                raise ChaintuneError(f"j must satisfy 2 <= a <= b <= sample_steps={self.chain.sample_steps} (paper "
                                     f"steps; step 1 is the first-order step), got {e.j!r}")
        if self.optim.peft not in ("none", "lora"):
            raise ChaintuneError("align trains full weights (peft none) or LoRA (peft lora)")
        if self.pilot.pilot:
            from chaintune.errors import unknown_name
            from chaintune.estimators.registry import ESTIMATORS
            from chaintune.run.pilot import parse_lrs

            parse_lrs(self.pilot.pilot_lrs)
            for name in self.pilot.estimators(e.name):
                if name not in ESTIMATORS:
                    raise unknown_name("estimator", name, tuple(ESTIMATORS))
        if self.chain.controlnet is not None and self.guards.retention_weight > 0:
            raise ChaintuneError("--retention-weight replays the base model's samples without a control; with "
                                 "--controlnet the base is frozen and keeps what it knew: use --retention-weight 0")
        if self.chain.group_size is not None and self.optim.batch_size % self.chain.group_size:
            raise ChaintuneError(f"batch_size={self.optim.batch_size} must be a multiple of group_size="
                                 f"{self.group_size} (samples per prompt)")
        try:
            b1, b2 = (float(v) for v in self.chain.stage_boundaries.split(","))
        except ValueError:
            raise ChaintuneError(f"stage_boundaries must be two fractions b1,b2, got "
                                 f"{self.chain.stage_boundaries!r}") from None
        if not 0 <= b1 <= b2 <= 1:
            raise ChaintuneError(f"stage_boundaries must satisfy 0 <= b1 <= b2 <= 1, got {b1},{b2}")
