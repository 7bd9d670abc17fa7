"""Model backends and :func:`load`, which turns a model id into a :class:`DiffusionModel`.

A model id is one of:

* ``builtin:NAME`` — a model shipped inside the package (``builtin:digits``, ``builtin:glyphs``);
* a local diffusers directory (``DDPMPipeline``/``DDIMPipeline``, ``StableDiffusionPipeline``,
  ``DiTPipeline``, ``StableDiffusion3Pipeline`` (flow matching), or a bare ``UNet2DModel``);
* a chaintune run directory (written by ``chaintune align`` / ``chaintune transfer``);
* a Hugging Face hub id (resolved through the local cache when offline).

The backend classes are imported lazily (PEP 562), so reading run metadata
(:mod:`chaintune.backends.run_dir`) does not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING

from chaintune.backends import files
from chaintune.backends.base import parse_video_shape
from chaintune.backends.files import check_model_dir, is_model_dir, read_json, reading_model
from chaintune.backends.run_dir import RUN_MARKER, is_run_dir, load_run
from chaintune.errors import ChaintuneError, shown
from chaintune.utils.io import pickle_allowed

if TYPE_CHECKING:
    from chaintune.backends.base import Conditions, DiffusionModel
    from chaintune.backends.dit import DiTModel
    from chaintune.backends.flow import FlowModel
    from chaintune.backends.flux import FluxModel
    from chaintune.backends.sd import StableDiffusionModel
    from chaintune.backends.sdxl import SDXLModel
    from chaintune.backends.unet import UNetModel
    from chaintune.backends.wan import WanModel

# public name -> module that defines it
_LAZY = {
    "Conditions": "chaintune.backends.base",
    "DiffusionModel": "chaintune.backends.base",
    "UNetModel": "chaintune.backends.unet",
    "StableDiffusionModel": "chaintune.backends.sd",
    "DiTModel": "chaintune.backends.dit",
    "FlowModel": "chaintune.backends.flow",
    "SDXLModel": "chaintune.backends.sdxl",
    "FluxModel": "chaintune.backends.flux",
    "WanModel": "chaintune.backends.wan",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'chaintune.backends' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

__all__ = [
    "Conditions",
    "DiffusionModel",
    "UNetModel",
    "StableDiffusionModel",
    "DiTModel",
    "FlowModel",
    "SDXLModel",
    "FluxModel",
    "WanModel",
    "load",
    "builtin_path",
    "BUILTIN_MODELS",
    "ModelNotFoundError",
    "RUN_MARKER",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_MODELS = {
    "digits": "DDPM on scikit-learn's 8x8 handwritten digits (unconditional UNet2DModel)",
    "glyphs": "DDPM on digits rendered from matplotlib's DejaVu fonts (transfer source domain)",
    "digits-cond": "class-conditional pixel UNet2DConditionModel on 16x16 digits (ControlNet base)",
    "moving-digits": "text-to-video pixel-space Wan transformer: 8-frame 16x16 clips of a digit moving as the prompt "
                     "says ('a 7 moving left slowly')",
}


class ModelNotFoundError(ChaintuneError, FileNotFoundError):
    """A model id that is not a builtin, a local directory, a run, or a cached hub model."""


def builtin_path(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        import difflib

        close = difflib.get_close_matches(name, BUILTIN_MODELS, n=1)
        hint = f" (did you mean builtin:{close[0]}?)" if close else ""
        raise ModelNotFoundError(f"unknown builtin model {name!r}{hint}; available: {sorted(BUILTIN_MODELS)}")
    path = ASSETS / name
    if not (path / "model_index.json").exists():
        raise ModelNotFoundError(
            f"builtin:{name} is not built in this install; rebuild it with "
            f"`chaintune pretrain --config chaintune/configs/builtin_{name}.yaml --out runs/builtin-{name}` and copy "
            f"runs/builtin-{name}/model/ to {path}"
        )
    return path


# diffusers pipeline class (model_index.json's _class_name) -> "module:loader(path, source)"; a backend adds one line
PIPELINE_LOADERS = {
    "DDPMPipeline": "chaintune.backends.unet:load_unet",
    "DDIMPipeline": "chaintune.backends.unet:load_unet",
    "StableDiffusionPipeline": "chaintune.backends.sd:load_sd",
    "StableDiffusion3Pipeline": "chaintune.backends.flow:load_flow",
    "DiTPipeline": "chaintune.backends.dit:load_dit",
    "FluxPipeline": "chaintune.backends.flux:load_flux",
    "WanPipeline": "chaintune.backends.wan:load_wan",
    "StableDiffusionXLPipeline": "chaintune.backends.sdxl:load_sdxl",
    "ChaintunePixelCondPipeline": "chaintune.backends.pixel_cond:load_pixel_cond",
}


def _load_dir(path: Path, source: str, allow_pickle: bool = False) -> DiffusionModel:
    """The model in folder ``path``, recognised by its top level, its files checked (:mod:`.files`) before the
    backend's loader reads them, and what the libraries raise while reading them reported as one input error."""

    if not is_model_dir(path):
        raise ModelNotFoundError(f"{path} is not a diffusers model directory (no model_index.json or config.json at "
                                 "its top level)")
    check_model_dir(path, allow_pickle)
    index = path / "model_index.json"
    cls = read_json(index if index.is_file() else path / "config.json").get("_class_name", "")
    target = PIPELINE_LOADERS.get(cls) if index.is_file() else BARE_MODEL_LOADERS.get(cls)
    if target is None and index.is_file() and isinstance(cls, str) and cls.startswith("StableDiffusion") \
            and "XL" not in cls and "3" not in cls:
        target = PIPELINE_LOADERS["StableDiffusionPipeline"]  # SD 1.x/2.x variants share the backend
    if target is None:
        what, known = ("pipeline", PIPELINE_LOADERS) if index.is_file() else ("model", BARE_MODEL_LOADERS)
        raise ChaintuneError(f"{path}: {what} {shown(cls)} is not supported; chaintune loads "
                             f"{', '.join(sorted(known))}")
    module, _, fn = target.partition(":")
    loader = getattr(importlib.import_module(module), fn)
    # diffusers/transformers then refuse a pickle themselves, whatever the guard above missed
    options = {} if pickle_allowed(allow_pickle) else {"use_safetensors": True}
    with reading_model(path):
        return loader(path, source, **_accepted(loader, options))


def _accepted(loader, options: dict) -> dict:
    """The ``options`` that ``loader`` takes (one that takes ``**kwargs`` passes them on to ``from_pretrained``)."""
    params = inspect.signature(loader).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return options
    names = {p.name for p in params}
    return {k: v for k, v in options.items() if k in names}


# a folder holding one model (config.json, no model_index.json): its _class_name -> loader
BARE_MODEL_LOADERS = {"UNet2DModel": "chaintune.backends.unet:load_unet"}

PICKLE_SUFFIXES = files.PICKLE_SUFFIXES
check_safe_weights = files.check_safe_weights


def load(model_id: str | os.PathLike, device: str | None = None, allow_pickle: bool = False,
         vae_chunk: int | None = None, video_shape: str | None = None) -> DiffusionModel:
    """Load a model id (see module docstring) as a :class:`DiffusionModel`.

    ``vae_chunk`` decodes latents through the VAE ``vae_chunk`` samples at a time (latent backends),
    trading speed for peak memory when a differentiable reward backpropagates through the decoder.
    ``video_shape`` (``"FRAMESxHEIGHTxWIDTH"``) sets the size a video model samples at.

    Weights are read from safetensors; a directory with only pickled weights is refused unless
    ``allow_pickle`` (pickles can execute code when loaded).
    """
    model_id = str(model_id)
    if model_id.startswith("builtin:"):
        model = _load_dir(builtin_path(model_id.split(":", 1)[1]), model_id, allow_pickle)
    else:
        path = Path(model_id).expanduser()
        if path.is_dir() and is_run_dir(path):
            model = load_run(path, lambda mid: load(mid, allow_pickle=allow_pickle))  # the run's model/ or base
        elif path.is_dir():
            model = _load_dir(path, model_id, allow_pickle)
        elif path.exists():
            raise ModelNotFoundError(f"{model_id} is a file; a model id is a directory, builtin:NAME or a hub id")
        else:
            model = _load_dir(_hub_snapshot(model_id), model_id, allow_pickle)
    if device is not None:
        model.to(device)
    if vae_chunk is not None:
        if vae_chunk < 1:
            raise ValueError(f"vae_chunk must be >= 1, got {vae_chunk}")
        if hasattr(model, "vae_chunk"):
            model.vae_chunk = int(vae_chunk)
    if video_shape:
        if not model.produces_video:
            raise ChaintuneError(f"--video-shape is for video models; {model_id} makes images")

        model.set_video_shape(*parse_video_shape(video_shape))
    for m in model.modules().values():
        m.eval()
    return model


def _hub_snapshot(model_id: str) -> Path:
    looks_like_path = model_id.startswith((".", "/", "~")) or model_id.count("/") != 1
    if looks_like_path:
        raise ModelNotFoundError(f"model {model_id!r} not found: no such directory, and not a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
    except Exception as e:  # network errors, offline mode, missing repo
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else type(e).__name__
        raise ModelNotFoundError(
            f"model {model_id!r} is not a local directory and could not be fetched from the hub: {why}"
        ) from e
