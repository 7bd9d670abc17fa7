"""What every backend provides to the chain: a denoiser closure, latent shape and a decoder.

A backend never steps a scheduler itself (that is ``chaintune.chain``'s job); it only turns
(x_t, t, conditions) into the model output the scheduler expects, with classifier-free guidance
applied, and turns final latents into images in [0, 1].

Code outside ``chaintune.backends`` never branches on a backend's ``kind`` (a recorded name, for
manifests and messages); it asks the model what it can do: :attr:`~DiffusionModel.takes_labels`,
:attr:`~DiffusionModel.takes_prompts`, :meth:`~DiffusionModel.null_conditions`,
:attr:`~DiffusionModel.has_null_branch`, :attr:`~DiffusionModel.decodes_latents`,
:attr:`~DiffusionModel.pixel_shape`, :attr:`~DiffusionModel.produces_video`, :attr:`~DiffusionModel.needs_control` and
:meth:`~DiffusionModel.save_lora_weights`. A new backend answers these and every trainer works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from chaintune.errors import ChaintuneError


@dataclass
class Conditions:
    """Per-sample conditioning for a batch: class labels and/or prompts, plus guidance.

    ``control`` holds one control image per sample ([n, C, H, W] in [0, 1]) for a model steered by a
    ControlNet; it is indexed with the batch (``subset``, ``repeat``, ``cat``) and reaches rewards as
    ``metadata["control"]`` (:meth:`reward_kwargs`), so a consistency reward sees what each sample was asked to
    follow."""

    labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    guidance_scale: float = 1.0
    extra: dict = field(default_factory=dict)
    control: torch.Tensor | None = None

    def repeat(self, times: int) -> Conditions:
        return Conditions(
            labels=None if self.labels is None else self.labels.repeat_interleave(times),
            prompts=None if self.prompts is None else [p for p in self.prompts for _ in range(times)],
            guidance_scale=self.guidance_scale,
            extra=dict(self.extra),
            control=None if self.control is None else self.control.repeat_interleave(times, 0),
        )

    def subset(self, idx: Sequence[int]) -> Conditions:
        return Conditions(
            labels=None if self.labels is None else self.labels[list(idx)],
            prompts=None if self.prompts is None else [self.prompts[i] for i in idx],
            guidance_scale=self.guidance_scale,
            extra=dict(self.extra),
            control=None if self.control is None else self.control[list(idx)],
        )

    def reward_kwargs(self) -> dict:
        """What a reward is called with besides the images (``reward(images, **cond.reward_kwargs())``); metadata
        only where there is some, so a plain ``fn(images, prompts, labels)`` keeps working."""
        kwargs = {"prompts": self.prompts, "labels": self.labels}
        if self.control is not None:
            kwargs["metadata"] = {"control": self.control}
        return kwargs

    @staticmethod
    def cat(parts: Sequence[Conditions]) -> Conditions:
        """One batch from several (e.g. target samples, then bank samples on the null branch).

        Every part must carry the same fields (labels and/or prompts, control), the same guidance and no
        ``extra``: a backend reads a batch's conditions as a whole, so "given for some samples, missing
        for others" cannot be expressed. Raises ``ValueError`` otherwise (callers then run the parts
        as separate batches).
        """
        if not parts:
            raise ValueError("Conditions.cat needs at least one part")
        first = parts[0]
        for p in parts:
            if p.extra:
                raise ValueError("Conditions with extra fields cannot be concatenated")
            if ((p.labels is None) != (first.labels is None) or (p.prompts is None) != (first.prompts is None)
                    or (p.control is None) != (first.control is None)):
                raise ValueError("Conditions.cat: parts differ in which of labels/prompts/control they carry")
            if p.guidance_scale != first.guidance_scale:
                raise ValueError("Conditions.cat: parts differ in guidance_scale")
        return Conditions(
            labels=None if first.labels is None else torch.cat([p.labels for p in parts]),
            prompts=None if first.prompts is None else [q for p in parts for q in p.prompts],
            guidance_scale=first.guidance_scale,
            control=None if first.control is None else torch.cat([p.control for p in parts]),
        )


def vae_pixel_shape(vae: nn.Module, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of the images an ``AutoencoderKL`` decodes ``latent_shape`` latents to."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    _, h, w = latent_shape
    return int(vae.config.in_channels), h * scale, w * scale


class DiffusionModel:
    """A loaded diffusion model: ``denoiser`` (the trainable module), ``scheduler``, decoder.

    Subclasses implement :meth:`denoise_fn`, :meth:`decode` and :meth:`save`, and override the
    capability answers below that differ from the defaults (an unconditional pixel-space image model).
    """

    kind: str = "base"  # a recorded name (bank manifests, messages); decisions use the capabilities
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

    # ------------------------------------------------------------------ capabilities

    @property
    def takes_labels(self) -> bool:
        """Whether the model takes class labels (``Conditions.labels`` in ``[0, num_classes)``)."""
        return self.conditional and self.num_classes is not None

    @property
    def class_conditional(self) -> bool:
        """Alias of :attr:`takes_labels` (the older name)."""
        return self.takes_labels

    @property
    def takes_prompts(self) -> bool:
        """Whether the model takes text prompts (``Conditions.prompts``)."""
        return False

    default_prompts: str | None = None
    """A prompt source (:func:`chaintune.prompts.load_prompts`) the model ships for runs given none, e.g.
    ``builtin:moving-digits`` — the prompts it was trained on."""

    @property
    def null_label(self) -> int | None:
        """The class id of the unconditional branch, if the model has one (classifier-free guidance)."""
        return None

    @property
    def has_null_branch(self) -> bool:
        """Whether :meth:`null_conditions` is a branch of its own, distinct from the conditional ones
        (empty prompt, null class). False for an unconditional model: its only branch is the one
        every sample trains, so training a knowledge bank on the "null branch" competes with the target."""
        return self.takes_prompts or self.null_label is not None

    def null_conditions(self, n: int) -> Conditions:
        """Conditions of the unconditional branch for ``n`` samples (what Diff-Tuning's bank trains on,
        and what a base model is scored with on data it was not conditioned on)."""
        return Conditions()

    @property
    def decodes_latents(self) -> bool:
        """Whether the denoiser works on VAE latents (``decode``/``encode_images`` run the VAE)."""
        return False

    @property
    def needs_control(self) -> bool:
        """Whether every sample needs a control image (``Conditions.control``): a ControlNet-steered model."""
        return False

    @property
    def produces_video(self) -> bool:
        """Whether samples are videos: latents ``[N, C, f, h, w]``, decoded ``[N, F, C, H, W]`` (what rewards get)."""
        return False

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model generates and trains on (before any VAE)."""
        if self.decodes_latents:
            raise NotImplementedError(f"{type(self).__name__} must give its pixel_shape")
        return tuple(self.latent_shape)

    def reference_images(self, x_T: torch.Tensor, steps: int, cond: Conditions) -> torch.Tensor | None:
        """What the model's own diffusers pipeline makes from ``x_T`` in ``steps`` deterministic steps (eta 0, the
        chain's scheduler) under ``cond``: the reference ``chaintune check`` holds the chain to. None where no
        diffusers pipeline samples this model from given latents (its pipeline draws its own noise, or there is no
        pipeline for it); there the scheduler step is checked against diffusers' in the tests instead."""
        return None

    def save_lora_weights(self, directory: str | Path, lora_state_dict: dict[str, torch.Tensor]) -> bool:
        """Write ``lora_state_dict`` (peft keys) to ``directory`` in diffusers' LoRA format, so the
        pipeline's ``load_lora_weights`` reads it. Returns False where diffusers has no LoRA loader for
        this kind of pipeline (the peft-format adapter chaintune writes is then the only one)."""
        return False

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
        """Write a directory that plain diffusers loads with ``from_pretrained`` (with ``self.denoiser``)."""
        raise NotImplementedError

    def controlnet_reference_images(self, controlnet: nn.Module, scale: float, x_T: torch.Tensor, steps: int,
                                    cond: Conditions) -> torch.Tensor | None:
        """:meth:`reference_images` of this model steered by ``controlnet`` (``cond.control``): its diffusers
        ControlNet pipeline at eta 0; None where chaintune has none for this family."""
        return None

    def save_with_controlnet(self, path: str | Path, controlnet: nn.Module) -> bool:
        """Write the diffusers ControlNet pipeline of this model with ``controlnet``; False where diffusers has none
        that chaintune supports for this family."""
        return False

    def with_denoiser(self, denoiser: nn.Module) -> DiffusionModel:
        """A shallow copy that runs and saves ``denoiser`` instead (e.g. with adapters merged or folded)."""
        import copy

        model = copy.copy(self)
        model.denoiser = denoiser
        return model


class PromptConditioned:
    """Mixin for text-conditioned backends (SD, SD3, SDXL, FLUX, Wan): prompts in, the empty prompt as the
    unconditional branch (what classifier-free guidance and Diff-Tuning's bank use)."""

    conditional = True
    takes_prompts = True

    def null_conditions(self, n: int) -> Conditions:
        return Conditions(prompts=[""] * n)

    def default_conditions(self, n: int, generator: torch.Generator | None = None) -> Conditions:
        return Conditions(prompts=[""] * n, guidance_scale=1.0)


class VAELatents:
    """Mixin for latent backends: the denoiser works on VAE latents; images have the VAE's pixel shape."""

    decodes_latents = True

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        return vae_pixel_shape(self.vae, self.latent_shape)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x = vae.decode(z / scaling + shift) in chunks of ``vae_chunk`` (peak memory of reward backprop)."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
        chunk = self.vae_chunk or z.shape[0]
        parts = [self.vae.decode(z[i: i + chunk].to(self.vae.dtype)).sample for i in range(0, z.shape[0], chunk)]
        return (torch.cat(parts).float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.sample()
        return (z - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor


class PooledPromptCFG:
    """Mixin for backends whose denoiser takes sequence and pooled prompt embeddings (SD3, SDXL): the training
    output and the guided chain closure, given ``_call(x, t, emb, pooled)`` and ``encode_conditions`` with keys
    ``cond``/``pooled`` (and ``uncond``/``uncond_pooled`` under guidance). Both branches run in one batch,
    unconditional first, as the diffusers pipelines do."""

    def model_output(self, x, t, cond, encoded=None):
        enc = encoded or self.encode_conditions(cond)
        return self._call(x, t, enc["cond"], enc["pooled"])

    def denoise_fn(self, cond, encoded=None):
        enc = encoded or self.encode_conditions(cond)
        g = cond.guidance_scale
        if g == 1.0:
            return lambda x, t: self._call(x, t, enc["cond"], enc["pooled"])
        emb = torch.cat([enc["uncond"], enc["cond"]])
        pooled = torch.cat([enc["uncond_pooled"], enc["pooled"]])

        def fn(x, t):
            tt = t if t.dim() == 0 else torch.cat([t, t])
            u, c = self._call(torch.cat([x, x]), tt, emb, pooled).chunk(2)
            return u + g * (c - u)

        return fn


def parse_video_shape(text: str) -> tuple[int, int, int]:
    """``'33x480x832'`` -> (frames, height, width)."""
    try:
        f, h, w = (int(p) for p in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise ChaintuneError(f"a video shape is FRAMESxHEIGHTxWIDTH, e.g. 33x480x832, got {text!r}") from None
    return f, h, w
