"""SDXL text-to-image backend: a ``StableDiffusionXLPipeline``'s UNet, two text encoders and VAE.

The trainable module is the UNet (``UNet2DConditionModel`` with ``addition_embed_type="text_time"``).
Prompts go through the pipeline's own ``encode_prompt`` (penultimate hidden states of CLIP-L and
CLIP-G, concatenated, plus CLIP-G's pooled projection), once per batch. Every UNet call also gets
SDXL's micro-conditioning ``time_ids`` = original_size + crops_coords_top_left + target_size, which
default to the pixel size of the latents and (0, 0), as in the pipeline.

The empty prompt is SDXL's unconditional branch. With ``force_zeros_for_empty_prompt`` (the SDXL
base config) that branch is all-zero embeddings (SDXL dropped captions by zeroing them in training,
and the pipeline's classifier-free guidance uses zeros as its negative): so an empty prompt here is
zeros too, which makes :meth:`null_conditions`, the CFG branch and Diff-Tuning's bank one branch.

SDXL's VAE overflows in half precision (``vae.config.force_upcast``): decoding and encoding then
run in fp32 with autocast off, whatever precision the rest of the model uses.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from chaintune.backends.base import Conditions, DiffusionModel, PooledPromptCFG, PromptConditioned, VAELatents
from chaintune.backends.sd import UNetPipelineReference
from chaintune.chain import SUPPORTED, as_chain_scheduler


def _chain_scheduler(scheduler):
    """The chain's scheduler. SDXL ships Euler; DDIM on its schedule must not clip x_0 to [-1, 1]
    (a pixel-space default): a config that does not say so gets the latent-model values SDXL publishes."""
    if isinstance(scheduler, SUPPORTED) or "clip_sample" in scheduler.config:
        return as_chain_scheduler(scheduler)
    extra = {} if "set_alpha_to_one" in scheduler.config else {"set_alpha_to_one": False}
    return DDIMScheduler.from_config(scheduler.config, clip_sample=False, **extra)


class SDXLModel(UNetPipelineReference, PooledPromptCFG, PromptConditioned, VAELatents, DiffusionModel):
    kind = "sdxl"

    def __init__(self, pipe: StableDiffusionXLPipeline, source: str = "", vae_chunk: int | None = None,
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None):
        self.pipe = pipe
        self.denoiser = pipe.unet
        self.scheduler = _chain_scheduler(pipe.scheduler)
        self.vae = pipe.vae
        self.source = source
        self.vae_chunk = vae_chunk
        self.original_size = original_size
        self.crops_coords_top_left = tuple(crops_coords_top_left)
        self.target_size = target_size
        self.vae.requires_grad_(False)
        for m in self._text_encoders().values():
            m.requires_grad_(False)

    def _text_encoders(self) -> dict[str, torch.nn.Module]:
        encs = {k: getattr(self.pipe, k, None) for k in ("text_encoder", "text_encoder_2")}
        return {k: e for k, e in encs.items() if e is not None}

    def modules(self):
        return {"denoiser": self.denoiser, "vae": self.vae, **self._text_encoders()}

    @property
    def latent_shape(self):
        s = self.denoiser.config.sample_size
        s = (s, s) if isinstance(s, int) else tuple(s)
        return (self.denoiser.config.in_channels, *s)

    # ------------------------------------------------------------------ conditioning

    @property
    def zeros_for_empty_prompt(self) -> bool:
        return bool(self.pipe.config.get("force_zeros_for_empty_prompt", True))

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence embeddings [n, L, 768 + 1280], pooled CLIP-G projection [n, 1280])."""
        emb, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
        emb, pooled = emb.to(self.dtype), pooled.to(self.dtype)
        if self.zeros_for_empty_prompt:
            keep = torch.tensor([p != "" for p in prompts], device=emb.device, dtype=emb.dtype)
            emb, pooled = emb * keep[:, None, None], pooled * keep[:, None]
        return emb, pooled

    def time_ids(self, n: int) -> torch.Tensor:
        """SDXL's micro-conditioning: original size, crop corner, target size (pixels), one row per sample."""
        size = tuple(self.pixel_shape[1:])
        ids = [*(self.original_size or size), *self.crops_coords_top_left, *(self.target_size or size)]
        return torch.tensor([ids], device=self.device, dtype=self.dtype).expand(n, -1)

    def encode_conditions(self, cond: Conditions) -> dict:
        prompts = list(cond.prompts) if cond.prompts is not None else [""]
        emb, pooled = self._embed(prompts)
        enc = {"cond": emb, "pooled": pooled}
        if cond.guidance_scale != 1.0:
            enc["uncond"], enc["uncond_pooled"] = self._embed([""] * len(prompts))
        return enc

    def _call(self, x, t, emb, pooled):
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if emb.shape[0] != x.shape[0]:
            emb, pooled = emb.expand(x.shape[0], -1, -1), pooled.expand(x.shape[0], -1)
        added = {"text_embeds": pooled, "time_ids": self.time_ids(x.shape[0])}
        return self.denoiser(x, t.to(x.device), encoder_hidden_states=emb, added_cond_kwargs=added,
                             return_dict=False)[0]

    # ------------------------------------------------------------------ VAE

    def _vae_precision(self) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
        """(dtype, context) the VAE runs in: fp32 without autocast when the config forces an upcast."""
        if not self.vae.config.get("force_upcast", False):
            return self.vae.dtype, contextlib.nullcontext()
        if self.vae.dtype != torch.float32:
            self.vae.to(torch.float32)  # once, and kept: SDXL's fp16 VAE overflows
        return torch.float32, torch.autocast(self.vae.device.type, enabled=False)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(mean, std) of the VAE latents where the config gives them (else 0, 1), as the pipeline uses them."""
        cfg = self.vae.config
        if cfg.get("latents_mean") is None or cfg.get("latents_std") is None:
            return 0.0, 1.0
        shape = (1, -1, 1, 1)
        return (torch.tensor(cfg.latents_mean).view(shape).to(like), torch.tensor(cfg.latents_std).view(shape).to(like))

    def decode(self, latents):
        dtype, ctx = self._vae_precision()
        with ctx:
            mean, std = self._latent_stats(latents.to(dtype))
            z = latents.to(dtype) * std / self.vae.config.scaling_factor + mean
            chunk = self.vae_chunk or z.shape[0]
            parts = [self.vae.decode(z[i: i + chunk]).sample for i in range(0, z.shape[0], chunk)]
        return (torch.cat(parts).float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images):
        dtype, ctx = self._vae_precision()
        with ctx:
            z = self.vae.encode((images * 2 - 1).to(dtype)).latent_dist.sample()
            mean, std = self._latent_stats(z)
            z = (z - mean) * self.vae.config.scaling_factor / std
        return z.to(self.dtype)

    # ------------------------------------------------------------------ saving

    def save(self, path):
        """Save the pipeline with ``self.denoiser`` as its UNet (trainers swap in merged copies)."""
        pipe = self.pipe
        if pipe.unet is not self.denoiser:
            pipe = type(pipe)(**{**pipe.components, "unet": self.denoiser},
                              force_zeros_for_empty_prompt=self.zeros_for_empty_prompt)
        pipe.save_pretrained(str(path), safe_serialization=True)

    def save_with_controlnet(self, path, controlnet) -> bool:
        from diffusers import StableDiffusionXLControlNetPipeline

        c = self.pipe.components
        StableDiffusionXLControlNetPipeline(
            vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
            tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"], unet=self.denoiser, controlnet=controlnet,
            scheduler=c["scheduler"], force_zeros_for_empty_prompt=self.zeros_for_empty_prompt,
            add_watermarker=False).save_pretrained(str(path), safe_serialization=True)
        return True

    def save_lora_weights(self, directory, lora_state_dict) -> bool:
        """``pytorch_lora_weights.safetensors`` for ``StableDiffusionXLPipeline.load_lora_weights`` (UNet
        layers in diffusers' naming, as diffusers' SDXL LoRA training script writes them)."""
        from diffusers.utils import convert_state_dict_to_diffusers

        StableDiffusionXLPipeline.save_lora_weights(
            str(directory), unet_lora_layers=convert_state_dict_to_diffusers(lora_state_dict), safe_serialization=True
        )
        return True


def load_sdxl(path: str | Path, source: str = "", **kw) -> SDXLModel:
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), **kw)
    return SDXLModel(pipe, source=source or str(path))
