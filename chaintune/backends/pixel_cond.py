"""A pixel-space, class-conditional ``UNet2DConditionModel``: the built-in base a ControlNet is trained on.

Why a ``UNet2DConditionModel`` and not the ``UNet2DModel`` of ``builtin:digits``: diffusers'
``ControlNetModel`` is built from (``from_unet``) and feeds its residuals into a
``UNet2DConditionModel`` only. The digit class enters the way a prompt does, through
``encoder_hidden_states``: a one-hot class token of length ``num_classes + 1`` (the last slot is the
null class of classifier-free guidance), sequence length 1, with ``cross_attention_dim = num_classes + 1``.
Each cross-attention layer's key/value projections are then a learned embedding of the class token:
no text encoder to ship, and diffusers' ``UNet2DConditionModel`` / ``ControlNetModel`` take it as is (the
one-hot is what a pipeline would pass as ``prompt_embeds``; SD's pipelines themselves need a VAE, which a
pixel model has not, so chaintune's sampler runs it).

Saved as a diffusers-style directory: ``unet/`` (a ``UNet2DConditionModel``), ``scheduler/`` and a
``model_index.json`` naming :data:`PIPELINE_CLASS` (no VAE: samples are pixels in [-1, 1]); a trained
ControlNet over it adds ``controlnet/`` (a ``ControlNetModel``), and loading the directory then gives
the controlled model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from chaintune.backends.base import Conditions, DiffusionModel
from chaintune.backends.controlled import load_controlnet_into

__all__ = ["PIPELINE_CLASS", "PixelCondModel", "build_cond_unet", "load_pixel_cond", "class_tokens"]

PIPELINE_CLASS = "ChaintunePixelCondPipeline"


def build_cond_unet(arch) -> UNet2DConditionModel:
    """The UNet for ``arch``, a :class:`~chaintune.pretrain.config.ArchConfig` (the same options as ``pretrain``'s
    UNet2DModel; read by attribute, so this backend needs nothing from the trainers): plain ResNet blocks at full
    resolution, cross-attention to the class token below it (and in the middle block)."""
    if not arch.num_classes:
        raise ValueError("a class-conditional UNet needs arch.num_classes")
    n = len(arch.block_out_channels)
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D" if arch.attention else "DownBlock2D"] * (n - 1)
    up = ["CrossAttnUpBlock2D" if arch.attention else "UpBlock2D"] * (n - 1) + ["UpBlock2D"]
    return UNet2DConditionModel(
        sample_size=arch.resolution, in_channels=1, out_channels=1, layers_per_block=arch.layers_per_block,
        block_out_channels=tuple(arch.block_out_channels), down_block_types=tuple(down), up_block_types=tuple(up),
        norm_num_groups=arch.norm_num_groups, cross_attention_dim=arch.num_classes + 1, attention_head_dim=8,
    )


def class_tokens(labels: torch.Tensor, num_tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``encoder_hidden_states`` for class ``labels``: one-hot tokens [n, 1, num_tokens]."""
    return F.one_hot(labels.long(), num_tokens).to(dtype)[:, None, :]


class PixelCondModel(DiffusionModel):
    """Pixel-space digits conditioned through ``encoder_hidden_states`` (class token; last class = null)."""

    kind = "pixel-cond"

    def __init__(self, unet: UNet2DConditionModel, scheduler, source: str = ""):
        self.denoiser = unet
        self.scheduler = scheduler
        self.source = source

    @property
    def latent_shape(self):
        s = self.denoiser.config.sample_size
        s = (s, s) if isinstance(s, int) else tuple(s)
        return (self.denoiser.config.in_channels, *s)

    @property
    def num_tokens(self) -> int:
        return int(self.denoiser.config.cross_attention_dim)

    @property
    def conditional(self) -> bool:
        return True

    @property
    def num_classes(self) -> int:
        return self.num_tokens - 1

    @property
    def null_label(self) -> int:
        return self.num_tokens - 1

    def null_conditions(self, n: int) -> Conditions:
        return Conditions(labels=torch.full((n,), self.null_label, dtype=torch.long))

    def default_conditions(self, n, generator=None):
        return Conditions(labels=torch.randint(0, self.num_classes, (n,), generator=generator))

    def model_output(self, x, t, cond: Conditions, encoded=None):
        labels = cond.labels if cond.labels is not None else torch.full((x.shape[0],), self.null_label)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        ehs = class_tokens(labels.to(x.device), self.num_tokens, x.dtype)
        return self.denoiser(x, t.to(x.device), encoder_hidden_states=ehs).sample

    def denoise_fn(self, cond: Conditions, encoded=None):
        g = cond.guidance_scale
        if g == 1.0 or cond.labels is None:
            return lambda x, t: self.model_output(x, t, cond)

        def fn(x, t):
            both = Conditions(labels=torch.cat([torch.full_like(cond.labels, self.null_label), cond.labels]))
            u, c = self.model_output(torch.cat([x, x]), t, both).chunk(2)
            return u + g * (c - u)

        return fn

    def decode(self, latents):
        return (latents / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images):
        return images * 2 - 1

    def save(self, path) -> None:
        path = Path(path)
        self.denoiser.save_pretrained(str(path / "unet"), safe_serialization=True)
        self.scheduler.save_pretrained(str(path / "scheduler"))
        index = {"_class_name": PIPELINE_CLASS, "unet": ["diffusers", "UNet2DConditionModel"],
                 "scheduler": ["diffusers", type(self.scheduler).__name__]}
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    def save_with_controlnet(self, path, controlnet) -> bool:
        """The base's directory plus ``controlnet/`` (a ``ControlNetModel``), named in ``model_index.json``."""
        path = Path(path)
        self.save(path)
        controlnet.save_pretrained(str(path / "controlnet"), safe_serialization=True)
        index = json.loads((path / "model_index.json").read_text())
        index["controlnet"] = ["diffusers", "ControlNetModel"]
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return True


def load_pixel_cond(path: str | Path, source: str = "", **options) -> DiffusionModel:
    """The base of ``path``; with a ``controlnet/`` beside it, the controlled model (base + ControlNet).
    ``options`` go to ``from_pretrained`` (``use_safetensors=True`` where pickles are not allowed)."""
    path = Path(path)
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), **options)
    sched = DDPMScheduler.from_pretrained(str(path / "scheduler"))
    base = PixelCondModel(unet, sched, source=source or str(path))
    if (path / "controlnet" / "config.json").exists():
        return load_controlnet_into(base, path / "controlnet", **options)
    return base
