"""Wan 2.1 text-to-video backend: a ``WanPipeline``'s transformer, UMT5 text encoder and video VAE.

The trainable module is the ``WanTransformer3DModel`` (flow matching, velocity v = noise - x_0, timestep
t = 1000 * sigma). Samples are videos: latents are ``[n, C, f, h, w]`` (the VAE compresses time by 4 and
space by 8: ``F = 4 (f - 1) + 1`` frames), and :meth:`WanModel.decode` returns videos ``[n, F, C, H, W]``
in [0, 1], the layout video rewards (:mod:`chaintune.rewards.video`) receive.

**The chain's scheduler.** Wan ships a ``UniPCMultistepScheduler`` (``prediction_type='flow_prediction'``,
``use_flow_sigmas=True``, ``flow_shift`` 3.0 for 480p, 5.0 for 720p), a multistep ODE solver with no
per-step Gaussian transition. The chain needs one, so it runs a ``FlowMatchEulerDiscreteScheduler`` with
the same ``num_train_timesteps`` and ``shift = flow_shift`` (the SDE form of ``chaintune.chain``; eta = 0
is the Euler ODE sampler). This is what ``chaintune.sampling.chain_scheduler`` / ``make_scheduler('flow',
...)`` then build from ``model.scheduler.config`` (``make_scheduler('flow', unipc.config)`` itself would
lose the shift: UniPC calls it ``flow_shift``). Both schedules run sigma from ~1 to 0 through the same
shift map, so the model sees the noise levels it was trained on; trajectories differ from UniPC's only
by the solver. At eta = 0 ``chaintune.sample`` equals ``WanPipeline`` run with that Euler scheduler
(``WanModel.euler_pipeline()``), not with UniPC. Saving keeps the pipeline's own scheduler.

**Pixel space.** A pipeline saved without a VAE (``vae`` null in ``model_index.json``) denoises pixels in
[-1, 1] directly: latents are ``[n, C, F, H, W]`` frames and decode is a rescale. ``builtin:moving-digits``
is such a Wan pipeline (16x16 px clips are too small for Wan's 8x spatial VAE); everything else — the
transformer, UMT5 prompts, the flow chain — is the code path of a real Wan model.

**Video size.** The transformer has no native size; a model samples ``num_frames`` x ``height`` x ``width``
pixels (pipeline defaults 81 x 480 x 832). Set them with :meth:`WanModel.set_video_shape`, the
``load_wan`` arguments, or ``CHAINTUNE_VIDEO_SHAPE=FxHxW`` (what the CLI uses); :meth:`WanModel.save`
records them in ``chaintune_video.json`` so a run reloads at the size it was trained at.

Prompts go through the pipeline's ``encode_prompt`` (cleaning, ``max_sequence_length`` UMT5 tokens, zeroed
padding) once per batch. Classifier-free guidance runs ``negative_prompt`` (default "", the pipeline's
default; Wan's authors recommend a long negative prompt) and the prompt as one batched call.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from chaintune.backends.base import Conditions, DiffusionModel, PromptConditioned, parse_video_shape
from chaintune.backends.files import read_json
from chaintune.errors import ChaintuneError, shown

VIDEO_SHAPE_FILE = "chaintune_video.json"
VIDEO_SHAPE_ENV = "CHAINTUNE_VIDEO_SHAPE"


def flow_chain_scheduler(scheduler):
    """The ``FlowMatchEulerDiscreteScheduler`` the chain runs for a Wan pipeline's scheduler (module docstring).

    A flow-matching Euler scheduler is used as it is; a flow-prediction UniPC/DPM scheduler becomes an Euler
    one with its ``num_train_timesteps`` and ``shift = flow_shift``; anything else is refused.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler
    cfg = scheduler.config
    if cfg.get("prediction_type") == "flow_prediction" or cfg.get("use_flow_sigmas", False):
        if cfg.get("use_dynamic_shifting", False):
            raise ChaintuneError(f"{type(scheduler).__name__} with use_dynamic_shifting is not supported for Wan")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                                               shift=float(cfg.get("flow_shift", 1.0) or 1.0))
    raise ChaintuneError(f"Wan pipeline scheduler {type(scheduler).__name__} is not a flow-matching scheduler "
                         "(prediction_type='flow_prediction'); chaintune needs one to build its chain")


class WanModel(PromptConditioned, DiffusionModel):
    kind = "wan"

    def __init__(self, pipe, source: str = "", vae_chunk: int | None = None, max_sequence_length: int = 512,
                 num_frames: int = 81, height: int = 480, width: int = 832, negative_prompt: str = "",
                 default_prompts: str | None = None, guidance_scale: float = 1.0):
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("boundary_ratio") is not None:
            raise ChaintuneError("two-transformer Wan pipelines (Wan 2.2 A14B) are not supported; use a Wan 2.1 "
                                 "pipeline (one transformer)")
        if pipe.config.get("expand_timesteps", False):
            raise ChaintuneError("Wan pipelines with expand_timesteps (Wan 2.2 TI2V) are not supported")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.scheduler = flow_chain_scheduler(pipe.scheduler)
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.source = source
        self.vae_chunk = vae_chunk
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt
        self.default_prompts = default_prompts
        self.guidance_scale = float(guidance_scale)  # the CFG scale sampling and training use when given none
        self.set_video_shape(num_frames, height, width)
        for m in (self.vae, self.text_encoder):
            if m is not None:
                m.requires_grad_(False)

    # ------------------------------------------------------------------ shapes

    @property
    def pixel_space(self) -> bool:
        """No VAE: the transformer denoises pixels in [-1, 1] (``builtin:moving-digits``)."""
        return self.vae is None

    @property
    def temporal_scale(self) -> int:
        return 1 if self.pixel_space else int(self.vae.config.get("scale_factor_temporal") or 4)

    @property
    def spatial_scale(self) -> int:
        return 1 if self.pixel_space else int(self.vae.config.get("scale_factor_spatial") or 8)

    def set_video_shape(self, num_frames: int, height: int, width: int) -> WanModel:
        """Sample ``num_frames`` frames of ``height`` x ``width`` pixels (frames = 4k + 1, sizes multiples of
        VAE scale x patch size, as ``WanPipeline`` requires; it would round silently, we refuse)."""
        ts, ss = self.temporal_scale, self.spatial_scale
        _, ph, pw = self.denoiser.config.patch_size
        if num_frames < 1 or (num_frames - 1) % ts:
            raise ChaintuneError(f"Wan needs num_frames = {ts}k + 1 (e.g. 33, 49, 81), got {num_frames}")
        if height % (ss * ph) or width % (ss * pw) or height < 1 or width < 1:
            raise ChaintuneError(f"Wan needs height/width multiples of {ss * ph}/{ss * pw}, got {height}x{width}")
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width)."""
        return (int(self.denoiser.config.in_channels), (self.num_frames - 1) // self.temporal_scale + 1,
                self.height // self.spatial_scale, self.width // self.spatial_scale)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one frame."""
        channels = self.denoiser.config.out_channels if self.pixel_space else self.vae.config.out_channels
        return int(channels), self.height, self.width

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """(frames, channels, height, width) of one sample, as :meth:`decode` returns it."""
        return (self.num_frames, *self.pixel_shape)

    @property
    def produces_video(self) -> bool:
        return True

    @property
    def decodes_latents(self) -> bool:
        return True

    # ------------------------------------------------------------------ conditions

    def default_conditions(self, n: int, generator: torch.Generator | None = None) -> Conditions:
        """The empty prompt at the model's own guidance scale (``chaintune_video.json``'s ``guidance_scale``)."""
        return Conditions(prompts=[""] * n, guidance_scale=self.guidance_scale)

    def modules(self):
        mods = {"denoiser": self.denoiser, "vae": self.vae, "text_encoder": self.text_encoder}
        return {k: m for k, m in mods.items() if m is not None}

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        """[n, max_sequence_length, text_dim], padding zeroed, exactly as the pipeline embeds prompts."""
        emb, _ = self.pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                         max_sequence_length=self.max_sequence_length, device=self.device)
        return emb.to(self.dtype)

    def encode_conditions(self, cond: Conditions) -> dict:
        prompts = list(cond.prompts) if cond.prompts is not None else [""]
        enc = {"cond": self._embed(prompts)}
        if cond.guidance_scale != 1.0:
            neg = cond.extra.get("negative_prompt", self.negative_prompt)
            neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            if len(neg) != len(prompts):
                raise ChaintuneError(f"got {len(neg)} negative prompts for {len(prompts)} prompts")
            enc["uncond"] = self._embed(neg)
        return enc

    def _call(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # float32 timesteps, as the pipeline passes them (the embedder casts after the sinusoidal projection)
        t = torch.as_tensor(t, device=x.device).float()
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if emb.shape[0] != x.shape[0]:
            emb = emb.expand(x.shape[0], -1, -1)
        return self.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]

    def model_output(self, x, t, cond, encoded=None):
        enc = encoded or self.encode_conditions(cond)
        return self._call(x, t, enc["cond"])

    def denoise_fn(self, cond, encoded=None):
        enc = encoded or self.encode_conditions(cond)
        g = cond.guidance_scale
        if g == 1.0:
            return lambda x, t: self._call(x, t, enc["cond"])
        both = torch.cat([enc["uncond"], enc["cond"]])

        def fn(x, t):
            tt = t if torch.as_tensor(t).dim() == 0 else torch.cat([t, t])
            u, c = self._call(torch.cat([x, x]), tt, both).chunk(2)
            return u + g * (c - u)

        return fn

    # ------------------------------------------------------------------ pixels

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        view = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(view).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(view).to(like.device, like.dtype)
        return mean, inv_std

    def decode(self, latents):
        """Latents [n, C, f, h, w] -> videos [n, F, C, H, W] in [0, 1] (differentiable)."""
        if latents.dim() != 5:
            raise ChaintuneError(f"Wan latents are [n, C, frames, h, w], got {tuple(latents.shape)}")
        if self.pixel_space:
            return (latents.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
        z = latents.to(self.vae.dtype)
        mean, inv_std = self._latent_stats(z)
        z = z / inv_std + mean  # the pipeline's un-normalisation, same float ops
        chunk = self.vae_chunk or z.shape[0]
        parts = [self.vae.decode(z[i: i + chunk], return_dict=False)[0] for i in range(0, z.shape[0], chunk)]
        video = torch.cat(parts).float()  # [n, C, F, H, W] in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def encode_images(self, images):
        """Videos [n, F, C, H, W] in [0, 1] -> normalised latents [n, C, f, h, w] (a posterior sample), as diffusers'
        Wan training scripts normalise them: (z - latents_mean) / latents_std."""
        if images.dim() != 5:
            raise ChaintuneError(f"Wan encodes videos [n, frames, C, H, W] in [0, 1], got {tuple(images.shape)}; "
                                 "a batch of images is a video of one frame: images[:, None]")
        x = images.permute(0, 2, 1, 3, 4) * 2 - 1
        if self.pixel_space:
            return x.to(self.dtype)
        x = x.to(self.vae.dtype)
        chunk = self.vae_chunk or x.shape[0]
        z = torch.cat([self.vae.encode(x[i: i + chunk]).latent_dist.sample() for i in range(0, x.shape[0], chunk)])
        mean, inv_std = self._latent_stats(z)
        return (z - mean) * inv_std

    # ------------------------------------------------------------------ saving

    def euler_pipeline(self):
        """The ``WanPipeline`` with the chain's Euler scheduler (what eta = 0 sampling reproduces)."""
        return type(self.pipe)(**{**self.pipe.components, "transformer": self.denoiser,
                                  "scheduler": self.scheduler})

    def reference_images(self, x_T, steps, cond):
        """``WanPipeline`` with the chain's Euler scheduler (:meth:`euler_pipeline`), the same negative prompt; None
        for a pixel-space model (the built-in moving digits: no VAE, which WanPipeline needs)."""
        if self.pipe.vae is None:
            return None
        pipe = self.euler_pipeline()
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompt=cond.prompts, negative_prompt=cond.extra.get("negative_prompt", self.negative_prompt),
                        num_inference_steps=steps, guidance_scale=cond.guidance_scale, latents=x_T,
                        max_sequence_length=self.max_sequence_length, height=self.height, width=self.width,
                        num_frames=self.num_frames, output_type="pt").frames

    def save(self, path):
        """The pipeline with ``self.denoiser`` as its transformer (its own scheduler), plus the video size."""
        pipe = self.pipe
        if pipe.transformer is not self.denoiser:
            pipe = type(pipe)(**{**pipe.components, "transformer": self.denoiser})
        pipe.save_pretrained(str(path), safe_serialization=True)
        shape = {"num_frames": self.num_frames, "height": self.height, "width": self.width,
                 "max_sequence_length": self.max_sequence_length}
        if self.default_prompts:
            shape["default_prompts"] = self.default_prompts
        if self.guidance_scale != 1.0:
            shape["guidance_scale"] = self.guidance_scale
        (Path(path) / VIDEO_SHAPE_FILE).write_text(json.dumps(shape, indent=1) + "\n")

    def save_lora_weights(self, directory, lora_state_dict) -> bool:
        """``pytorch_lora_weights.safetensors`` for ``WanPipeline.load_lora_weights`` (peft keys of the transformer)."""
        from diffusers import WanPipeline

        WanPipeline.save_lora_weights(str(directory), transformer_lora_layers=lora_state_dict, safe_serialization=True)
        return True


# what chaintune_video.json may set, and the type each must have
_SAVED_OPTIONS = {"num_frames": int, "height": int, "width": int, "max_sequence_length": int, "default_prompts": str,
                  "guidance_scale": float}


def _saved_video_options(saved: Path) -> dict:
    """The known options of a model's ``chaintune_video.json``, each of its type (sizes >= 1): a damaged file is
    refused naming it, not an error inside the sampler later."""

    out = {}
    for key, value in read_json(saved).items():
        kind = _SAVED_OPTIONS.get(key)
        if kind is None:
            continue
        ok = isinstance(value, str) if kind is str else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (kind is float or (float(value).is_integer() and value >= 1)))
        if not ok:
            raise ChaintuneError(f"{saved}: {key} must be {'a string' if kind is str else 'a number'}"
                                 f"{' >= 1' if kind is int else ''}, got {shown(value)}; the model folder is damaged")
        out[key] = kind(value)
    return out


def load_wan(path: str | Path, source: str = "", **kw) -> WanModel:
    """A :class:`WanModel` from a ``WanPipeline`` directory; the video size comes from ``CHAINTUNE_VIDEO_SHAPE``,
    else the directory's ``chaintune_video.json``, else the pipeline's defaults (81 x 480 x 832)."""
    from diffusers import WanPipeline

    path = Path(path)
    opts: dict = {}
    saved = path / VIDEO_SHAPE_FILE
    if saved.exists():
        opts.update(_saved_video_options(saved))
    if os.environ.get(VIDEO_SHAPE_ENV):
        opts["num_frames"], opts["height"], opts["width"] = parse_video_shape(os.environ[VIDEO_SHAPE_ENV])
    model_kw = {k: kw.pop(k) for k in ("num_frames", "height", "width", "max_sequence_length", "negative_prompt",
                                       "vae_chunk", "default_prompts", "guidance_scale") if k in kw}
    index = json.loads((path / "model_index.json").read_text())
    for name in ("transformer_2", "vae"):  # a component saved as null must be passed as None explicitly
        if name not in kw and (index.get(name) is None or index.get(name) == [None, None]):
            kw[name] = None
    pipe = WanPipeline.from_pretrained(str(path), **kw)
    return WanModel(pipe, source=source or str(path), **{**opts, **model_kw})
