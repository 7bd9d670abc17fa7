"""Rectified-flow text-to-image backend: a ``StableDiffusion3Pipeline``'s transformer, encoders, VAE.

The trainable module is the ``SD3Transformer2DModel`` (velocity prediction, v = noise - x_0). The
chain runs ``FlowMatchEulerDiscreteScheduler`` in its SDE form (``chaintune.chain``: eta = 0 is
the pipeline's Euler ODE sampler, eta > 0 gives Gaussian steps with exact log-probs).

Prompts go through the pipeline's own ``encode_prompt`` (CLIP-L + CLIP-G, plus T5 when present;
without ``text_encoder_3`` the T5 part is zeros, as in diffusers), once per batch, with
``max_sequence_length`` T5 tokens. Classifier-free guidance uses empty negative prompts, like the
pipeline. Decoding applies the VAE's ``shift_factor`` and ``scaling_factor``
(x = vae.decode(z / scaling + shift)) and can run in chunks (``vae_chunk``) to bound memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chaintune.backends.base import Conditions, DiffusionModel, PooledPromptCFG, PromptConditioned, VAELatents
from chaintune.chain import as_chain_scheduler


class FlowModel(PooledPromptCFG, PromptConditioned, VAELatents, DiffusionModel):
    kind = "flow"

    def __init__(self, pipe, source: str = "", vae_chunk: int | None = None, max_sequence_length: int = 256):
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.scheduler = as_chain_scheduler(pipe.scheduler)
        self.vae = pipe.vae
        self.source = source
        self.vae_chunk = vae_chunk
        self.max_sequence_length = max_sequence_length
        self.vae.requires_grad_(False)
        for m in self._text_encoders():
            m.requires_grad_(False)

    def _text_encoders(self) -> list[torch.nn.Module]:
        encs = [getattr(self.pipe, k, None) for k in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        return [e for e in encs if e is not None]

    def modules(self):
        mods = {"denoiser": self.denoiser, "vae": self.vae}
        for k in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, k, None) is not None:
                mods[k] = getattr(self.pipe, k)
        return mods

    @property
    def latent_shape(self):
        c = self.denoiser.config
        s = c.sample_size
        s = (s, s) if isinstance(s, int) else tuple(s)
        return (c.in_channels, *s)

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence embeddings [n, L, joint_attention_dim], pooled [n, pooled_projection_dim])."""
        emb, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return emb.to(self.dtype), pooled.to(self.dtype)

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
        return self.denoiser(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                             timestep=t.to(x.device, x.dtype), return_dict=False)[0]

    def save(self, path):
        """Save the pipeline with ``self.denoiser`` as its transformer (trainers swap in merged copies)."""
        pipe = self.pipe
        if pipe.transformer is not self.denoiser:
            pipe = type(pipe)(**{**pipe.components, "transformer": self.denoiser})
        pipe.save_pretrained(str(path), safe_serialization=True)

    def reference_images(self, x_T, steps, cond):
        """``StableDiffusion3Pipeline`` with this transformer and the chain's Euler scheduler."""
        pipe = type(self.pipe)(**{**self.pipe.components, "transformer": self.denoiser, "scheduler": self.scheduler})
        pipe.set_progress_bar_config(disable=True)
        _, h, w = self.pixel_shape
        with torch.no_grad():
            return pipe(prompt=cond.prompts, num_inference_steps=steps, guidance_scale=cond.guidance_scale,
                        latents=x_T, output_type="pt", max_sequence_length=self.max_sequence_length, height=h,
                        width=w).images

    def save_lora_weights(self, directory, lora_state_dict) -> bool:
        """``pytorch_lora_weights.safetensors`` for ``StableDiffusion3Pipeline.load_lora_weights`` (peft
        keys of the transformer, as diffusers' SD3 LoRA training script writes them)."""
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(str(directory), transformer_lora_layers=lora_state_dict,
                                                   safe_serialization=True)
        return True


def load_flow(path: str | Path, source: str = "", **kw) -> FlowModel:
    import json

    from diffusers import StableDiffusion3Pipeline

    index = json.loads((Path(path) / "model_index.json").read_text())
    # components saved as null (no T5, no IP-adapter image encoder) must be passed as None explicitly
    for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):
        if name not in kw and (index.get(name) is None or index.get(name) == [None, None]):
            kw[name] = None
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), **kw)
    return FlowModel(pipe, source=source or str(path))
