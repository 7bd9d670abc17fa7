"""Latent text-to-image backend: a ``StableDiffusionPipeline``'s UNet, text encoder and VAE.

The trainable module is the UNet (``UNet2DConditionModel``). Prompts are encoded once per batch
(constant along the chain); classifier-free guidance runs the conditional and unconditional
(empty-prompt) branches in one batched call. Decoding goes through the VAE, so a differentiable
reward backpropagates through it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from chaintune.backends.base import Conditions, DiffusionModel, PromptConditioned, VAELatents
from chaintune.chain import as_chain_scheduler


class UNetPipelineReference:
    """``reference_images`` of the UNet text-to-image pipelines (SD, SDXL): the model's own pipeline class with this
    denoiser and DDIM on the pipeline's own scheduler config, eta 0 (a chain ported wrong differs from it)."""

    def reference_images(self, x_T, steps, cond):
        pipe = type(self.pipe)(**{**self.pipe.components, "unet": self.denoiser,
                                  "scheduler": DDIMScheduler.from_config(self.pipe.scheduler.config)})
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompt=cond.prompts, num_inference_steps=steps, guidance_scale=cond.guidance_scale,
                        latents=x_T, eta=0.0, output_type="pt").images


class StableDiffusionModel(UNetPipelineReference, PromptConditioned, VAELatents, DiffusionModel):
    kind = "sd"

    def __init__(self, pipe: StableDiffusionPipeline, source: str = "", vae_chunk: int | None = None):
        self.pipe = pipe
        self.denoiser = pipe.unet
        self.scheduler = as_chain_scheduler(pipe.scheduler)
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.source = source
        self.vae_chunk = vae_chunk
        for m in (self.vae, self.text_encoder):
            m.requires_grad_(False)

    def modules(self):
        return {"denoiser": self.denoiser, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self):
        s = self.denoiser.config.sample_size
        s = (s, s) if isinstance(s, int) else tuple(s)
        return (self.denoiser.config.in_channels, *s)

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)

    def encode_conditions(self, cond: Conditions) -> dict:
        prompts = cond.prompts if cond.prompts is not None else [""]
        enc = {"cond": self._embed(list(prompts))}
        if cond.guidance_scale != 1.0:
            enc["uncond"] = self._embed([""] * len(prompts))
        return enc

    def model_output(self, x, t, cond, encoded=None):
        encoded = encoded or self.encode_conditions(cond)
        emb = encoded["cond"]
        if emb.shape[0] != x.shape[0]:
            emb = emb.expand(x.shape[0], -1, -1)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.denoiser(x, t.to(x.device), encoder_hidden_states=emb).sample

    def denoise_fn(self, cond, encoded=None):
        enc = encoded or self.encode_conditions(cond)
        g = cond.guidance_scale
        if g == 1.0:
            return lambda x, t: self.model_output(x, t, cond, enc)
        both = torch.cat([enc["uncond"], enc["cond"]])

        def fn(x, t):
            tt = t.expand(2 * x.shape[0]) if t.dim() == 0 else torch.cat([t, t])
            out = self.denoiser(torch.cat([x, x]), tt.to(x.device), encoder_hidden_states=both).sample
            u, c = out.chunk(2)
            return u + g * (c - u)

        return fn

    def save(self, path):
        """Save the pipeline with ``self.denoiser`` as its UNet (trainers swap in merged copies)."""
        pipe = self.pipe
        if pipe.unet is not self.denoiser:
            pipe = type(pipe)(**{**pipe.components, "unet": self.denoiser})
        pipe.save_pretrained(str(path), safe_serialization=True)

    def _controlnet_pipeline(self, controlnet, scheduler=None):
        from diffusers import StableDiffusionControlNetPipeline

        c = self.pipe.components
        return StableDiffusionControlNetPipeline(
            vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=self.denoiser,
            controlnet=controlnet, scheduler=scheduler or c["scheduler"], safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    def save_with_controlnet(self, path, controlnet) -> bool:
        self._controlnet_pipeline(controlnet).save_pretrained(str(path), safe_serialization=True)
        return True

    def controlnet_reference_images(self, controlnet, scale, x_T, steps, cond):
        """``StableDiffusionControlNetPipeline`` with this UNet and ``controlnet``, DDIM at eta 0."""
        pipe = self._controlnet_pipeline(controlnet, DDIMScheduler.from_config(self.pipe.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        h, w = self.pixel_shape[1:]
        with torch.no_grad():
            return pipe(prompt=cond.prompts, image=cond.control, height=h, width=w, num_inference_steps=steps,
                        guidance_scale=cond.guidance_scale, eta=0.0, latents=x_T, controlnet_conditioning_scale=scale,
                        output_type="pt").images

    def save_lora_weights(self, directory, lora_state_dict) -> bool:
        """``pytorch_lora_weights.safetensors`` for ``StableDiffusionPipeline.load_lora_weights``."""
        from diffusers.utils import convert_state_dict_to_diffusers

        StableDiffusionPipeline.save_lora_weights(
            str(directory), unet_lora_layers=convert_state_dict_to_diffusers(lora_state_dict), safe_serialization=True
        )
        return True


def load_sd(path: str | Path, source: str = "", **kw) -> StableDiffusionModel:
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), safety_checker=None, requires_safety_checker=False, **kw
    )
    return StableDiffusionModel(pipe, source=source or str(path))
