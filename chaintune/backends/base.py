"""What every backend provides to the chain: a denoiser closure, latent shape and a decoder.

A backend never steps a scheduler itself (that is ``chaintune.chain``'s job); it only turns
(x_t, t, conditions) into the model output the scheduler expects, with classifier-free guidance
applied, and turns final latents into images in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass
class Conditions:
    """Per-sample conditioning for a batch: class labels and/or prompts, plus guidance."""

    labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    guidance_scale: float = 1.0
    extra: dict = field(default_factory=dict)

    def repeat(self, times: int) -> Conditions:
        return Conditions(
            labels=None if self.labels is None else self.labels.repeat_interleave(times),
            prompts=None if self.prompts is None else [p for p in self.prompts for _ in range(times)],
            guidance_scale=self.guidance_scale,
            extra=dict(self.extra),
        )

    def subset(self, idx: Sequence[int]) -> Conditions:
        return Conditions(
            labels=None if self.labels is None else self.labels[list(idx)],
            prompts=None if self.prompts is None else [self.prompts[i] for i in idx],
            guidance_scale=self.guidance_scale,
            extra=dict(self.extra),
        )


class DiffusionModel:
    """A loaded diffusion model: ``denoiser`` (the trainable module), ``scheduler``, decoder.

    Subclasses implement :meth:`denoise_fn`, :meth:`decode` and :meth:`save`.
    """

    kind: str = "base"
    denoiser: nn.Module
    scheduler: object
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def conditional(self) -> bool:
        """Whether the model takes labels or prompts."""
        return False

    @property
    def num_classes(self) -> int | None:
        return None

    @property
    def class_conditional(self) -> bool:
        """Whether the model takes class labels (SD and flow models take prompts instead)."""
        return self.conditional and self.num_classes is not None

    def to(self, device) -> DiffusionModel:
        for m in self.modules().values():
            m.to(device)
        return self

    def modules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser}

    def default_conditions(self, n: int, generator: torch.Generator | None = None) -> Conditions:
        """Conditions used when the caller gives none (random classes / empty prompt)."""
        return Conditions()

    def encode_conditions(self, cond: Conditions) -> dict:
        """Precompute whatever is constant along the chain (text embeddings, null labels)."""
        return {}

    def denoise_fn(self, cond: Conditions, encoded: dict | None = None):
        """Return ``(x_t, t) -> model_output`` for the chain."""
        raise NotImplementedError

    def model_output(self, x: torch.Tensor, t: torch.Tensor, cond: Conditions, encoded=None) -> torch.Tensor:
        """Unguided model output for training losses (``t`` may be per-sample)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], differentiable."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents the denoiser is trained on."""
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """Write a directory that plain diffusers loads with ``from_pretrained``."""
        raise NotImplementedError
