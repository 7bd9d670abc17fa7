"""FLUX.1 text-to-image backend: a ``FluxPipeline``'s transformer, CLIP + T5 encoders and VAE.

The trainable module is the ``FluxTransformer2DModel`` (rectified flow, velocity v = noise - x_0, as
SD3: the chain runs ``FlowMatchEulerDiscreteScheduler`` in its SDE form from ``chaintune.chain``, so
eta = 0 is the pipeline's Euler sampler and eta > 0 gives Gaussian steps with exact log-probs).

Design decisions:

* **Latents stay unpacked**, ``[n, C, H, W]`` (C = ``transformer.in_channels // 4`` = 16 for FLUX.1);
  :meth:`FluxModel.denoise_fn` packs them into FLUX's 2x2 patch tokens ``[n, H/2 * W/2, 4C]`` for the
  transformer and unpacks its output. Packing is a fixed permutation of the entries and every chain
  operation is elementwise (the Euler/SDE step) or a sum over all entries (the Gaussian log-prob), so
  trajectories and log-probs are the pipeline's, entry for entry. Unpacked latents are also what the
  VAE, ``encode_images``, Diff-Tuning's bank, ``add_noise`` and ``pixel_shape`` expect of every latent
  backend, and :func:`chaintune.sampling.initial_noise` draws ``[n, *latent_shape]`` from a generator
  exactly as ``FluxPipeline.prepare_latents`` does before it packs.
* **The schedule is the pipeline's.** ``FluxPipeline`` always sets ``sigmas = linspace(1, 1/N, N)`` and
  ``mu = calculate_shift(image tokens, scheduler config)`` (resolution-dependent dynamic shifting). The
  model's scheduler is a :class:`FluxChainScheduler`: it carries ``chain_mu`` (computed from the model's
  resolution, which ``chaintune.chain`` requires for dynamic shifting) and defaults ``set_timesteps`` to
  the pipeline's sigma grid, so the chain never guesses either.
* **Guidance.** Guidance-distilled models (FLUX.1-dev, ``transformer.config.guidance_embeds``) take
  ``Conditions.guidance_scale`` as the transformer's guidance embedding (one model call per step, no
  classifier-free guidance); the default is the pipeline's 3.5, for sampling and training alike.
  ``true_cfg_scale`` > 1 adds the pipeline's "true CFG" against the empty prompt. Models without the
  embedding (FLUX.1-schnell) use ``guidance_scale`` as true CFG against the empty prompt, like SD3.
* Prompts go through ``FluxPipeline.encode_prompt`` (CLIP pooled output + T5 sequence, ``text_ids``
  zeros), once per batch; the transformer gets ``timestep / 1000`` and ``img_ids`` of the packed grid.
* LoRA: chaintune's generic targets (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) hit the joint attention
  of FLUX's double-stream blocks and q/k/v of its single-stream blocks: the attention projections that
  diffusers' ``train_dreambooth_lora_flux.py --lora_layers attn.to_k,attn.to_q,attn.to_v,attn.to_out.0``
  trains (its default also adds the text stream and feed-forwards); Flow-GRPO adds the text-stream
  projections (``add_{q,k,v}_proj``, ``to_add_out``). :meth:`save_lora_weights` writes diffusers' FLUX
  format, so ``FluxPipeline.load_lora_weights`` reads a chaintune adapter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from chaintune.backends.base import Conditions, DiffusionModel, PromptConditioned, VAELatents

DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (the embedding of FLUX.1-dev)


def flux_mu(image_seq_len: int, config) -> float:
    """FluxPipeline's ``calculate_shift``: mu linear in the number of packed image tokens."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + base_shift - m * base_len


class FluxChainScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps`` does what ``FluxPipeline`` passes it:
    sigmas ``linspace(1, 1/N, N)`` and the resolution's ``mu`` (``chain_mu``), unless given explicitly."""

    chain_mu: float | None = None

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if sigmas is None and timesteps is None and num_inference_steps and not self.config.get("use_flow_sigmas"):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if mu is None and self.config.use_dynamic_shifting:
            mu = self.chain_mu
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[n, C, H, W] -> FLUX's 2x2 patch tokens [n, H/2 * W/2, 4C] (``FluxPipeline._pack_latents``)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latents of height ``h`` and width ``w``."""
    n, _, c4 = x.shape
    return x.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


class FluxModel(PromptConditioned, VAELatents, DiffusionModel):
    kind = "flux"

    def __init__(self, pipe, source: str = "", vae_chunk: int | None = None, max_sequence_length: int = 512,
                 height: int | None = None, width: int | None = None, true_cfg_scale: float = 1.0):
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.source = source
        self.vae_chunk = vae_chunk
        self.max_sequence_length = max_sequence_length
        self.true_cfg_scale = float(true_cfg_scale)
        self.scheduler = FluxChainScheduler.from_config(pipe.scheduler.config)
        default = pipe.default_sample_size * pipe.vae_scale_factor
        self.set_resolution(height or default, width or default)
        self.vae.requires_grad_(False)
        for m in self._text_encoders().values():  # frozen: no dropout either (T5 has some)
            m.requires_grad_(False).eval()

    def set_resolution(self, height: int, width: int) -> None:
        """Generate ``height`` x ``width`` images (multiples of 2 * vae_scale_factor, as in the pipeline);
        updates ``latent_shape`` and the scheduler's resolution-dependent shift ``chain_mu``."""
        f = 2 * self.pipe.vae_scale_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"FLUX height and width must be positive multiples of {f}, got {height}x{width}")
        self.height, self.width = int(height), int(width)
        _, h, w = self.latent_shape
        self.scheduler.chain_mu = flux_mu((h // 2) * (w // 2), self.scheduler.config)

    def _text_encoders(self) -> dict[str, torch.nn.Module]:
        encs = {k: getattr(self.pipe, k, None) for k in ("text_encoder", "text_encoder_2")}
        return {k: e for k, e in encs.items() if e is not None}

    def modules(self):
        return {"denoiser": self.denoiser, "vae": self.vae, **self._text_encoders()}

    # ------------------------------------------------------------------ capabilities

    @property
    def latent_shape(self):
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels // 4, 2 * (self.height // (2 * f)), 2 * (self.width // (2 * f)))

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer is guidance-distilled (guidance is an input, not CFG)."""
        return bool(self.denoiser.config.guidance_embeds)

    def null_conditions(self, n: int) -> Conditions:
        return Conditions(prompts=[""] * n, guidance_scale=self._default_guidance())

    def _default_guidance(self) -> float:
        return DEFAULT_GUIDANCE if self.guidance_embeds else 1.0

    def default_conditions(self, n, generator=None):
        return Conditions(prompts=[""] * n, guidance_scale=self._default_guidance())

    # ------------------------------------------------------------------ denoiser

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T5 sequence [n, L, joint_attention_dim], CLIP pooled [n, pooled_projection_dim], text_ids [L, 3])."""
        emb, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return emb.to(self.dtype), pooled.to(self.dtype), text_ids

    def _cfg_scale(self, cond: Conditions) -> float:
        """The true-CFG scale: ``true_cfg_scale`` for distilled models, ``guidance_scale`` otherwise."""
        return self.true_cfg_scale if self.guidance_embeds else cond.guidance_scale

    def encode_conditions(self, cond: Conditions) -> dict:
        prompts = list(cond.prompts) if cond.prompts is not None else [""]
        emb, pooled, text_ids = self._embed(prompts)
        enc = {"cond": emb, "pooled": pooled, "text_ids": text_ids}
        if self._cfg_scale(cond) != 1.0:
            enc["uncond"], enc["uncond_pooled"], _ = self._embed([""] * len(prompts))
        return enc

    def _call(self, x: torch.Tensor, t: torch.Tensor, emb, pooled, text_ids, guidance: float) -> torch.Tensor:
        n, _, h, w = x.shape
        t = t.expand(n) if t.dim() == 0 else t
        if emb.shape[0] != n:
            emb, pooled = emb.expand(n, -1, -1), pooled.expand(n, -1)
        g = torch.full((n,), guidance, device=x.device, dtype=torch.float32) if self.guidance_embeds else None
        img_ids = self.pipe._prepare_latent_image_ids(n, h // 2, w // 2, x.device, emb.dtype)
        out = self.denoiser(hidden_states=pack_latents(x), timestep=t.to(x.device, x.dtype) / 1000, guidance=g,
                            pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=text_ids.to(x.device),
                            img_ids=img_ids, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def model_output(self, x, t, cond, encoded=None):
        """The transformer's velocity with ``cond.guidance_scale`` as guidance embedding (no CFG)."""
        enc = encoded or self.encode_conditions(cond)
        return self._call(x, t, enc["cond"], enc["pooled"], enc["text_ids"], cond.guidance_scale)

    def denoise_fn(self, cond, encoded=None):
        enc = encoded or self.encode_conditions(cond)
        g, cfg = cond.guidance_scale, self._cfg_scale(cond)
        if cfg == 1.0:
            return lambda x, t: self._call(x, t, enc["cond"], enc["pooled"], enc["text_ids"], g)

        def fn(x, t):
            c = self._call(x, t, enc["cond"], enc["pooled"], enc["text_ids"], g)
            u = self._call(x, t, enc["uncond"], enc["uncond_pooled"], enc["text_ids"], g)
            return u + cfg * (c - u)

        return fn

    # ------------------------------------------------------------------ VAE, saving

    def save(self, path):
        """Save the pipeline with ``self.denoiser`` as its transformer (trainers swap in merged copies)."""
        pipe = self.pipe
        if pipe.transformer is not self.denoiser:
            pipe = type(pipe)(**{**pipe.components, "transformer": self.denoiser})
        pipe.save_pretrained(str(path), safe_serialization=True)

    def reference_images(self, x_T, steps, cond):
        """``FluxPipeline`` with this transformer on the packed initial latents (its guidance embedding)."""
        pipe = type(self.pipe)(**{**self.pipe.components, "transformer": self.denoiser})
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompt=cond.prompts, num_inference_steps=steps, guidance_scale=cond.guidance_scale,
                        latents=pack_latents(x_T), output_type="pt", max_sequence_length=self.max_sequence_length,
                        height=self.height, width=self.width).images

    def save_lora_weights(self, directory, lora_state_dict) -> bool:
        """``pytorch_lora_weights.safetensors`` for ``FluxPipeline.load_lora_weights`` (peft keys of the
        transformer under ``transformer.``, as diffusers' FLUX LoRA training script writes them)."""
        from diffusers import FluxPipeline

        FluxPipeline.save_lora_weights(str(directory), transformer_lora_layers=lora_state_dict,
                                       safe_serialization=True)
        return True


def load_flux(path: str | Path, source: str = "", **kw) -> FluxModel:
    import json

    from diffusers import FluxPipeline

    index = json.loads((Path(path) / "model_index.json").read_text())
    for name in ("image_encoder", "feature_extractor"):  # saved as null: pass None explicitly
        if name not in kw and (index.get(name) is None or index.get(name) == [None, None]):
            kw[name] = None
    pipe = FluxPipeline.from_pretrained(str(path), **kw)
    return FluxModel(pipe, source=source or str(path))
