"""``ControlNetConfig``: every option of ``chaintune controlnet``. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from chaintune.errors import ChaintuneError
from chaintune.options import option, section
from chaintune.run.config import EvalConfig, OptimConfig, RunConfig

METHODS = ("diff-tuning", "plain")
TIMESTEP_LAWS = ("psi", "uniform")
CONDITIONS = ("edges", "silhouette")  # chaintune.data.conditions.CONDITIONS (kept torch-free here)


@dataclass
class ControlOptions:
    """How the ControlNet trains: timestep law (Diff-Tuning's psi or uniform), conditioning, CFG dropout."""

    timestep_law: str | None = option(None, "Timesteps of the denoising loss: psi (t ~ (t + 1)^alpha, more weight "
                                      "on large t: Diff-Tuning) | uniform (default: psi for diff-tuning, uniform "
                                      "for plain).", choices=TIMESTEP_LAWS)
    alpha: float = option(1.0, "psi(t) ∝ (t + 1)^alpha.", min=0)
    conditioning_scale: float = option(1.0, "Scale of the ControlNet's residuals (training and sampling).", min=0)
    label_dropout: float = option(0.5, "Share of labels/prompts replaced by the null condition, so the control "
                                  "alone must carry the image (ControlNet's 50%; keeps CFG working).", min=0, max=1)
    prompt: str = option("a {label}", "Prompt template for text models ({label}: the class id or folder name).")


@dataclass
class ControlNetEvalConfig(EvalConfig):
    eval_data: str = option("auto", "Held-out images whose conditions are evaluated (auto: digits:test for digit "
                            "data, else the last 10% of --data).")
    sample_steps: int = option(20, "DDIM steps of evaluation samples.", min=2)
    sample_eta: float = option(0.0, "DDIM eta of evaluation samples (0: deterministic, the same noise each time).",
                               min=0)
    grid_samples: int = option(16, "(condition | sample) pairs in each saved grid.", min=1, resumable=True)


@dataclass
class ControlNetConfig:
    """Every option of ``chaintune controlnet`` (CLI flags and config-file keys share these names)."""

    model: str = option("builtin:digits-cond", "Base model: builtin:digits-cond (pixel), an SD 1.x/2.x or SDXL "
                        "diffusers dir or hub id (a UNet2DConditionModel base).")
    data: str = option("digits:train", "Training images (conditions are extracted from them): digits:train, "
                       "glyphs:train, or a folder of images.")
    condition: str = option("edges", "Control: edges (Sobel, thresholded) | silhouette (blurred low-res mask).",
                            choices=CONDITIONS)
    method: str = option("diff-tuning", "diff-tuning (psi timesteps, frozen base) | plain (uniform timesteps).",
                         choices=METHODS)
    control: ControlOptions = section(ControlOptions)
    optim: OptimConfig = section(OptimConfig, steps=500, batch_size=32, lr=1e-4, gradient_checkpointing=False)
    eval: ControlNetEvalConfig = section(ControlNetEvalConfig, eval_every=50, eval_samples=64)
    run: RunConfig = section(RunConfig, out="runs/controlnet", log_every=10, save_every=0)

    def law(self) -> str:
        """The timestep law actually used."""
        if self.control.timestep_law is not None:
            return self.control.timestep_law
        return "psi" if self.method == "diff-tuning" else "uniform"

    def validate(self) -> None:
        from chaintune.options import check

        check(self)
        if self.method == "plain" and self.control.timestep_law == "psi":
            raise ChaintuneError("--method plain trains with uniform timesteps; psi is --method diff-tuning")
        if self.optim.peft not in ("none", "lora"):
            raise ChaintuneError("controlnet trains the whole ControlNet (peft none) or LoRA on it (peft lora)")

    @classmethod
    def from_dict(cls, values: dict) -> ControlNetConfig:
        from chaintune.options import from_dict

        return from_dict(cls, values, "controlnet option")
