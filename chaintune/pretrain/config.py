"""``chaintune pretrain``'s options: the pixel denoiser's architecture and noise schedule, and the run. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from chaintune.options import option, section
from chaintune.run.config import EvalConfig, OptimConfig, RunConfig


@dataclass
class ArchConfig:
    """The pixel-space denoiser and its noise schedule (how the built-in models are made): a UNet2DModel DDPM
    on images, or a Wan transformer (flow matching) on text-to-video clips."""

    denoiser: str = option("unet", "Architecture: unet (UNet2DModel DDPM on images) | wan (pixel-space "
                           "WanTransformer3DModel with a UMT5 prompt encoder, flow matching, on video clips).",
                           choices=("unet", "wan"))
    resolution: int = option(8, "Image (frame) size in pixels.", min=4)
    frames: int = option(8, "wan: frames per clip.", min=1)
    num_layers: int = option(4, "wan: transformer blocks.", min=1)
    num_attention_heads: int = option(4, "wan: attention heads.", min=1)
    attention_head_dim: int = option(16, "wan: width of one head (a multiple of 6: 3D RoPE splits it in three).",
                                     min=6)
    ffn_dim: int = option(128, "wan: feed-forward width.", min=1)
    patch_size: int = option(2, "wan: spatial patch size (patches are 1 frame x P x P pixels).", min=1)
    text_dim: int = option(32, "wan: width of the (frozen, randomly initialised) UMT5 prompt encoder.", min=2)
    text_layers: int = option(2, "wan: transformer layers of the prompt encoder (0: each token's embedding as is).",
                              min=0)
    flow_shift: float = option(1.0, "wan: flow_shift of the saved UniPC scheduler (the chain's Euler shift).", gt=0)
    block_out_channels: list[int] = option(factory=lambda: [32, 64, 64], help="Channels per UNet level.")
    layers_per_block: int = option(1, "ResNet layers per UNet block.", min=1)
    attention: bool = option(True, "Self-attention in the second level.")
    norm_num_groups: int = option(16, "GroupNorm groups.", min=1)
    num_classes: int | None = option(None, "Class-conditional with this many classes (one extra null class is "
                                     "added for guidance).", min=1)
    num_train_timesteps: int = option(1000, "Diffusion timesteps.", min=2)
    beta_schedule: str = option("squaredcos_cap_v2", "Noise schedule (a diffusers DDPMScheduler beta_schedule).",
                                choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    prediction_type: str = option("epsilon", "What the UNet predicts.", choices=("epsilon", "v_prediction"))


@dataclass
class PretrainConfig:
    """Every option of ``chaintune pretrain``: a small pixel DDPM from scratch."""

    dataset: str = option("digits:train", "Dataset id: digits:train, glyphs, digits-fewshot:K, or a folder; "
                          "moving-digits:train (procedural clips with prompts) for --denoiser wan.")
    label_dropout: float = option(0.1, "Share of labels (prompts) replaced by the null class (the empty prompt) for "
                                  "classifier-free guidance.", min=0, max=1)
    arch: ArchConfig = section(ArchConfig)
    optim: OptimConfig = section(OptimConfig, steps=4000, batch_size=128, lr=3e-4, warmup_steps=200,
                                 lr_schedule="cosine", ema_decay=0.999, gradient_checkpointing=False)
    eval: EvalConfig = section(EvalConfig, eval_every=0, eval_samples=64)
    run: RunConfig = section(RunConfig, out="runs/pretrain", log_every=20, save_every=0)

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        from chaintune.options import from_dict

        return from_dict(cls, values, "pretrain option")

    def validate(self) -> None:
        from chaintune.errors import ChaintuneError
        from chaintune.options import check

        check(self)
        if self.optim.peft != "none":
            raise ChaintuneError("pretrain trains every weight from scratch (peft none)")
        video = self.dataset.partition(":")[0] == "moving-digits"
        if video != (self.arch.denoiser == "wan"):
            raise ChaintuneError("--denoiser wan trains on video clips (--dataset moving-digits:train) and "
                                 f"moving-digits needs --denoiser wan; got --denoiser {self.arch.denoiser} "
                                 f"--dataset {self.dataset}")
