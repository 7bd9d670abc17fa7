"""A base diffusion model steered by a ControlNet: the trainable module is the ControlNet, the base is frozen.

The composition is one small ``nn.Module``, :class:`ControlledUNet`: it runs the ControlNet on the same
(x_t, t, encoder_hidden_states, added_cond_kwargs) as the base UNet plus the control image, and the base
UNet with the ControlNet's residuals added. A backend's own ``model_output`` / ``denoise_fn`` (SD's
prompt encoding and CFG batching, SDXL's micro-conditioning, the pixel base's class tokens) run
unchanged on ``base.with_denoiser(ControlledUNet(...))``; when CFG doubles the batch the control image
is repeated to match, as ``StableDiffusionControlNetPipeline`` does (``guess_mode=False``). So chaintune's
sampler and the diffusers pipeline compute the same thing.

The control image travels in ``Conditions.control``: [n, C, H, W] in [0, 1] at the model's
pixel size, C = ``ControlNetModel.config.conditioning_channels``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import chaintune
from chaintune.backends.base import Conditions, DiffusionModel
from chaintune.backends.files import check_model_dir, read_json, reading_model
from chaintune.backends.run_dir import is_run_dir, read_run_info
from chaintune.backends.sd import load_sd
from chaintune.backends.sdxl import load_sdxl
from chaintune.errors import ChaintuneError
from chaintune.utils.io import pickle_allowed

__all__ = ["ControlledUNet", "ControlledModel", "new_controlnet", "conditioning_embedding_channels",
           "load_controlnet_into", "load_controlled", "META_FILE"]

META_FILE = "chaintune_control.json"  # beside the ControlNetModel's config: which condition it was trained on


class ControlledUNet(nn.Module):
    """Base UNet + ControlNet residuals, with the call signature of a ``UNet2DConditionModel``."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module, conditioning_scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet, self.conditioning_scale = unet, controlnet, conditioning_scale
        self.control: torch.Tensor | None = None

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=True, **kw):
        if self.control is None:
            raise ChaintuneError("this model is steered by a ControlNet and needs a control image (a condition)")
        control = self.control.to(sample.device, sample.dtype)
        k, rem = divmod(sample.shape[0], control.shape[0])
        if rem or not k:
            raise ChaintuneError(f"{control.shape[0]} control images for a batch of {sample.shape[0]}")
        if k > 1:  # classifier-free guidance: [uncond; cond] halves share the control image
            control = control.repeat(k, 1, 1, 1)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=control,
                                    conditioning_scale=self.conditioning_scale, class_labels=class_labels,
                                    timestep_cond=timestep_cond, attention_mask=attention_mask,
                                    added_cond_kwargs=added_cond_kwargs, cross_attention_kwargs=cross_attention_kwargs,
                                    return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states, class_labels=class_labels,
                         timestep_cond=timestep_cond, attention_mask=attention_mask,
                         cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=return_dict, **kw)


def conditioning_embedding_channels(base: DiffusionModel) -> tuple[int, ...]:
    """Channels of the ControlNet's conditioning encoder, one stride-2 stage per factor of 2 between pixels and
    latents: SD's VAE (x8) gets diffusers' default (16, 32, 96, 256); a pixel-space base gets (16,), so the
    control image enters at full resolution and is not downsampled at all."""
    pixels, latents = base.pixel_shape[1], base.latent_shape[1]
    ratio = pixels // latents
    if ratio < 1 or pixels != ratio * latents or ratio & (ratio - 1):
        raise ChaintuneError(f"pixel size {pixels} is not a power-of-two multiple of the latent size {latents}")
    n = ratio.bit_length()  # stages = log2(ratio) + 1
    channels = [16, 32, 96, 256]
    while len(channels) < n:
        channels.append(channels[-1] * 2)
    return tuple(channels[:n])


def _check_unet(base: DiffusionModel) -> None:
    from diffusers import UNet2DConditionModel

    if not isinstance(base.denoiser, UNet2DConditionModel):
        raise ChaintuneError(f"a ControlNet is built from a UNet2DConditionModel (SD 1.x/2.x, SDXL or "
                             f"builtin:digits-cond); {base.source or base.kind!r} has a {type(base.denoiser).__name__}")


def new_controlnet(base: DiffusionModel):
    """A ``ControlNetModel`` copied from the base UNet's encoder (``from_unet``), zero convolutions at the exits:
    it starts as an exact no-op on the base model."""
    from diffusers import ControlNetModel

    _check_unet(base)
    cn = ControlNetModel.from_unet(base.denoiser, conditioning_embedding_out_channels=
                                   conditioning_embedding_channels(base), conditioning_channels=base.pixel_shape[0])
    _lora_reaches_the_control_path(cn)
    return cn.to(base.device) if base.dtype == torch.float32 else cn.to(base.device, base.dtype)


CONTROL_PATH = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")


def _lora_reaches_the_control_path(controlnet: nn.Module) -> None:
    """Make ``--peft lora`` put LoRA on the control path's convolutions too, not only on attention.

    Why: LoRA freezes every base weight, and a ControlNet's zero convolutions (and its conditioning encoder)
    *are* base weights: with LoRA on attention alone they stay zero and the ControlNet stays a no-op forever.
    LoRA (B = 0 at init) on a zero convolution starts at zero too, and learns a rank-r residual. The trainer's
    ``apply_lora`` calls ``add_adapter``, so this instance's ``add_adapter`` widens the targets."""
    names = [n for n, m in controlnet.named_modules() if isinstance(m, nn.Conv2d) and n.startswith(CONTROL_PATH)]
    add_adapter = controlnet.add_adapter

    def widened(config, adapter_name: str = "default"):
        config.target_modules = sorted(set(config.target_modules) | set(names))
        return add_adapter(config, adapter_name)

    controlnet.add_adapter = widened


class ControlledModel(DiffusionModel):
    """``base`` (frozen) steered by ``controlnet`` (``denoiser``: what trains and is checkpointed)."""

    def __init__(self, base: DiffusionModel, controlnet: nn.Module, condition: str = "edges",
                 conditioning_scale: float = 1.0, source: str = ""):
        _check_unet(base)
        self.base, self.denoiser = base, controlnet
        self.condition, self.conditioning_scale = condition, conditioning_scale
        self.scheduler = base.scheduler
        self.source = source or base.source
        self.kind = f"controlnet-{base.kind}"
        for m in base.modules().values():
            m.requires_grad_(False)

    # --------------------------------------------------------------- what the base answers
    latent_shape = property(lambda self: self.base.latent_shape)
    pixel_shape = property(lambda self: self.base.pixel_shape)
    conditional = property(lambda self: self.base.conditional)
    num_classes = property(lambda self: self.base.num_classes)
    takes_labels = property(lambda self: self.base.takes_labels)
    takes_prompts = property(lambda self: self.base.takes_prompts)
    null_label = property(lambda self: self.base.null_label)
    has_null_branch = property(lambda self: self.base.has_null_branch)
    decodes_latents = property(lambda self: self.base.decodes_latents)

    needs_control = True

    @property
    def conditioning_channels(self) -> int:
        return int(self.denoiser.config.conditioning_channels)

    def null_conditions(self, n: int) -> Conditions:
        return self.base.null_conditions(n)

    def default_conditions(self, n, generator=None):
        return self.base.default_conditions(n, generator)

    def modules(self):
        return {"denoiser": self.denoiser, **{f"base_{k}": m for k, m in self.base.modules().items()}}

    def decode(self, latents):
        return self.base.decode(latents)

    def encode_images(self, images):
        return self.base.encode_images(images)

    def encode_conditions(self, cond: Conditions) -> dict:
        return self.base.encode_conditions(cond)

    # --------------------------------------------------------------- the controlled denoiser
    def _runner(self, cond: Conditions) -> DiffusionModel:
        control = cond.control
        if control is None:
            raise ChaintuneError(f"{self.source!r} is a ControlNet run: give a condition image "
                                 f"(chaintune sample --controlnet RUN --condition IMG)")
        wrapper = ControlledUNet(self.base.denoiser, self.denoiser, self.conditioning_scale)
        wrapper.control = control
        return self.base.with_denoiser(wrapper)

    def model_output(self, x, t, cond, encoded=None):
        return self._runner(cond).model_output(x, t, cond, encoded)

    def denoise_fn(self, cond, encoded=None):
        return self._runner(cond).denoise_fn(cond, encoded)

    def reference_images(self, x_T, steps, cond):
        return self.base.controlnet_reference_images(self.denoiser, self.conditioning_scale, x_T, steps, cond)

    # --------------------------------------------------------------- saving
    def save(self, path) -> None:
        """A diffusers directory: ``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline``
        (base components + ``controlnet/``), or the pixel base's directory plus ``controlnet/``."""
        path, base = Path(path), self.base
        if not base.save_with_controlnet(path, self.denoiser):
            raise ChaintuneError(f"saving a ControlNet over a {type(base).__name__} is not supported (SD 1.x/2.x, SDXL "
                                 "and the pixel base are)")
        (path / "controlnet" / META_FILE).write_text(json.dumps(
            {"condition": self.condition, "conditioning_scale": self.conditioning_scale}) + "\n")


def load_controlnet_into(base: DiffusionModel, directory: str | Path, **options) -> ControlledModel:
    """``base`` steered by the ``ControlNetModel`` saved in ``directory`` (its condition kind from META_FILE);
    ``options`` go to ``from_pretrained`` (``use_safetensors=True`` where pickles are not allowed)."""
    from diffusers import ControlNetModel

    directory = Path(directory)
    cn = ControlNetModel.from_pretrained(str(directory), torch_dtype=base.dtype, **options).to(base.device).eval()
    cn.requires_grad_(False)  # loaded to sample; a trainer makes what it trains trainable itself
    _lora_reaches_the_control_path(cn)  # reward fine-tuning (align --controlnet) may put LoRA on it
    meta = json.loads((directory / META_FILE).read_text()) if (directory / META_FILE).exists() else {}
    return ControlledModel(base, cn, meta.get("condition", "edges"), float(meta.get("conditioning_scale", 1.0)),
                           source=str(directory.parent))


def load_controlled(model_id: str, base: str | None = None, device: str | None = None,
                    allow_pickle: bool = False) -> ControlledModel:
    """A ControlNet as a :class:`ControlledModel`: a ``chaintune controlnet`` run, its ``model/`` (any
    ``*ControlNetPipeline`` directory chaintune wrote), or a bare ``ControlNetModel`` directory over ``base``."""

    path = Path(model_id).expanduser()
    if is_run_dir(path):
        info = read_run_info(path)
        if info.get("command") != "controlnet" and not (info.get("command") == "align" and info.get("controlnet")):
            raise ChaintuneError(f"{path} is a {info.get('command')!r} run, not a ControlNet's (chaintune controlnet, "
                                 "or chaintune align --controlnet)")
        path = path / "model"
    if not path.is_dir():
        raise ChaintuneError(f"--controlnet {model_id}: no such run or directory")
    check_model_dir(path, allow_pickle)  # JSON that parses, no pickle without the opt-in, complete safetensors
    safe = {} if pickle_allowed(allow_pickle) else {"use_safetensors": True}
    if (path / "controlnet" / "config.json").exists():
        index = read_json(path / "model_index.json").get("_class_name", "")
        if index == "StableDiffusionControlNetPipeline":
            with reading_model(path):
                model = load_controlnet_into(load_sd(path, str(path), **safe), path / "controlnet", **safe)
        elif index == "StableDiffusionXLControlNetPipeline":
            with reading_model(path):
                model = load_controlnet_into(load_sdxl(path, str(path), **safe), path / "controlnet", **safe)
        else:
            model = chaintune.load(str(path), allow_pickle=allow_pickle)
    elif (path / "config.json").exists() and read_json(path / "config.json").get("_class_name") == "ControlNetModel":
        if base is None:
            raise ChaintuneError(f"{path} is a bare ControlNetModel: give the base model it was trained on")
        base_model = chaintune.load(base, allow_pickle=allow_pickle)
        with reading_model(path):
            model = load_controlnet_into(base_model, path, **safe)
    else:
        raise ChaintuneError(f"{path} holds no ControlNet (no controlnet/ nor a ControlNetModel config.json)")
    if not isinstance(model, ControlledModel):
        raise ChaintuneError(f"{model_id} did not load as a ControlNet-steered model")
    if device is not None:
        model.to(device)
    for m in model.modules().values():
        m.eval()
    return model
