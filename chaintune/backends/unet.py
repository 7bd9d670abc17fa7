"""Pixel-space ``UNet2DModel`` backend (unconditional or class-conditional).

Class-conditional models use diffusers' ``num_class_embeds``. Classifier-free guidance follows
the convention that the last class index (``num_class_embeds - 1``) is the null class; a model
trained without a null class simply runs with ``guidance_scale = 1``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from chaintune.backends.base import Conditions, DiffusionModel


class UNetModel(DiffusionModel):
    kind = "unet"

    def __init__(self, unet: UNet2DModel, scheduler, source: str = "", null_class: bool | None = None):
        self.denoiser = unet
        self.scheduler = scheduler
        self.source = source
        n_cls = unet.config.num_class_embeds
        # by default a class-conditional model with an odd class count reserves the last one as null
        self.has_null_class = bool(n_cls) if null_class is None else null_class

    @property
    def latent_shape(self):
        s = self.denoiser.config.sample_size
        s = (s, s) if isinstance(s, int) else tuple(s)
        return (self.denoiser.config.in_channels, *s)

    @property
    def conditional(self) -> bool:
        return bool(self.denoiser.config.num_class_embeds)

    @property
    def num_classes(self) -> int | None:
        n = self.denoiser.config.num_class_embeds
        if not n:
            return None
        return n - 1 if self.has_null_class else n

    @property
    def null_label(self) -> int | None:
        return self.denoiser.config.num_class_embeds - 1 if self.conditional and self.has_null_class else None

    @property
    def _fallback_label(self) -> int:
        """The label run when none is given: the null class, or class 0 for a model trained without one."""
        return self.null_label if self.null_label is not None else 0

    def null_conditions(self, n: int) -> Conditions:
        if not self.conditional:
            return Conditions()
        return Conditions(labels=torch.full((n,), self._fallback_label, dtype=torch.long))

    def default_conditions(self, n, generator=None):
        if not self.conditional:
            return Conditions()
        labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        return Conditions(labels=labels)

    def model_output(self, x, t, cond: Conditions, encoded=None):
        labels = None
        if self.conditional:
            labels = cond.labels if cond.labels is not None else torch.full(
                (x.shape[0],), self._fallback_label, dtype=torch.long
            )
            labels = labels.to(x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.denoiser(x, t.to(x.device), class_labels=labels).sample

    def denoise_fn(self, cond: Conditions, encoded=None):
        g = cond.guidance_scale
        if not self.conditional or g == 1.0 or self.null_label is None:
            return lambda x, t: self.model_output(x, t, cond)
        null = Conditions(labels=torch.full_like(cond.labels, self.null_label))

        def fn(x, t):
            both = Conditions(labels=torch.cat([null.labels, cond.labels]))
            u, c = self.model_output(torch.cat([x, x]), t, both).chunk(2)
            return u + g * (c - u)

        return fn

    def decode(self, latents):
        return (latents / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images):
        return images * 2 - 1

    def save(self, path):
        DDPMPipeline(unet=self.denoiser, scheduler=self.scheduler).save_pretrained(
            str(path), safe_serialization=True
        )


def load_unet(path: str | Path, source: str = "", **kw) -> UNetModel:
    """A DDPM/DDIM pipeline folder or a bare ``UNet2DModel`` folder; ``kw`` go to the UNet's ``from_pretrained``
    (``use_safetensors=True``: refuse pickled weights)."""
    path = Path(path)
    if (path / "model_index.json").exists():
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", **kw)
        sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    else:
        unet = UNet2DModel.from_pretrained(path, **kw)
        sched = DDPMScheduler()
    return UNetModel(unet, sched, source=source or str(path))
