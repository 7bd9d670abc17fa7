"""Class-conditional latent ``DiTTransformer2DModel`` backend (DiT-XL/2 and friends).

DiT predicts epsilon and a learned variance; like diffusers' ``DiTPipeline`` we keep the epsilon
half and use the scheduler's fixed variance, so every transition has an exact Gaussian
log-prob. The null class for guidance is ``num_embeds_ada_norm`` (1000 for ImageNet DiT).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

from chaintune.backends.base import Conditions, DiffusionModel, VAELatents
from chaintune.chain import as_chain_scheduler


class DiTModel(VAELatents, DiffusionModel):
    kind = "dit"

    def __init__(self, transformer: DiTTransformer2DModel, vae: AutoencoderKL, scheduler, source: str = "",
                 vae_chunk: int | None = None, id2label: dict | None = None):
        self.denoiser = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.source = source
        self.vae_chunk = vae_chunk
        self.id2label = id2label
        vae.requires_grad_(False)

    def modules(self):
        return {"denoiser": self.denoiser, "vae": self.vae}

    @property
    def latent_shape(self):
        c = self.denoiser.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def conditional(self) -> bool:
        return True

    @property
    def num_classes(self) -> int:
        return self.denoiser.config.num_embeds_ada_norm

    @property
    def null_label(self) -> int:
        return self.num_classes  # the extra embedding DiT reserves for label dropout

    def null_conditions(self, n: int) -> Conditions:
        return Conditions(labels=torch.full((n,), self.null_label, dtype=torch.long))

    def default_conditions(self, n, generator=None):
        return Conditions(labels=torch.randint(0, self.num_classes, (n,), generator=generator))

    def model_output(self, x, t, cond, encoded=None):
        labels = cond.labels if cond.labels is not None else torch.full((x.shape[0],), self.null_label)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        out = self.denoiser(x, timestep=t.to(x.device), class_labels=labels.to(x.device)).sample
        c = self.latent_shape[0]
        return out[:, :c] if out.shape[1] == 2 * c else out

    def denoise_fn(self, cond, encoded=None):
        g = cond.guidance_scale
        if g == 1.0:
            return lambda x, t: self.model_output(x, t, cond)
        labels = torch.cat([torch.full_like(cond.labels, self.null_label), cond.labels])

        def fn(x, t):
            u, c = self.model_output(torch.cat([x, x]), t, Conditions(labels=labels)).chunk(2)
            return u + g * (c - u)

        return fn

    def save(self, path):
        DiTPipeline(transformer=self.denoiser, vae=self.vae, scheduler=self.scheduler,
                    id2label=self.id2label).save_pretrained(str(path), safe_serialization=True)


def load_dit(path: str | Path, source: str = "", **kw) -> DiTModel:
    pipe = DiTPipeline.from_pretrained(str(path), **kw)
    return DiTModel(pipe.transformer, pipe.vae, as_chain_scheduler(pipe.scheduler), source=source or str(path))
