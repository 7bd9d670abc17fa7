"""A run directory: what ``align``/``transfer`` write, and a model id in its own right.

Layout::

    runs/X/
      chaintune_run.json   what ran: command, base model, peft method, resolved config, status
      config.yaml          the resolved config (re-runnable with --config)
      metrics.jsonl        one JSON object per logged step
      model/               the tuned model as a diffusers pipeline (from_pretrained) — LoRA merged
      adapter/             LoRA only: adapter weights (peft format; diffusers' load_lora_weights for SD)
      samples/             sample grids at each evaluation
      checkpoints/         resumable training state (see chaintune.training.checkpoint)
      tb/                  tensorboard logs

``chaintune.load("runs/X")`` loads ``model/`` when present, else the base model plus ``adapter/``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from chaintune.errors import ChaintuneError
from chaintune.utils.io import atomic_dir, save_json

RUN_MARKER = "chaintune_run.json"
MERGE_LIMIT = 300_000_000  # parameters; above this only the adapter is written (a merged SD is GBs)


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``path`` for a new run; refuse to clobber an existing run unless told."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if resume:
            return path
        if not overwrite:
            raise ChaintuneError(
                f"{path} already holds files; pass --resume to continue it or --overwrite to replace it")
        import shutil

        shutil.rmtree(path)
    elif resume:
        raise ChaintuneError(f"--resume: {path} does not exist")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_run_info(path: Path, info: dict) -> None:
    info = {**info, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save_json(path / RUN_MARKER, info)


def read_run_info(path: str | Path) -> dict:
    p = Path(path) / RUN_MARKER
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ChaintuneError(f"{p} is missing or corrupt: {e}") from e


def save_tuned_model(path: Path, model, peft: str, lora_rank: int | None = None) -> None:
    """Write ``model/`` (and ``adapter/`` for LoRA) atomically."""
    den = model.denoiser
    if peft == "lora":
        _save_adapter(path / "adapter", model, lora_rank)
        if sum(p.numel() for p in den.parameters()) > MERGE_LIMIT:
            return
        from chaintune.training.adapters import merge_lora

        merged = copy.copy(model)
        merged.denoiser = merge_lora(copy.deepcopy(den))
        if hasattr(merged, "pipe"):
            merged.pipe = copy.copy(model.pipe)
            merged.pipe.unet = merged.denoiser
        model = merged
    with atomic_dir(path / "model") as tmp:
        model.save(tmp)


def _save_adapter(target: Path, model, rank: int | None) -> None:
    from safetensors.torch import save_file

    from chaintune.training.adapters import lora_state_dict

    sd = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model.denoiser).items()}
    with atomic_dir(target) as tmp:
        save_file(sd, str(tmp / "adapter_model.safetensors"))
        save_json(tmp / "adapter_config.json", {"r": rank, "peft_type": "LORA"})
        if model.kind == "sd":
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers

            StableDiffusionPipeline.save_lora_weights(
                str(tmp), unet_lora_layers=convert_state_dict_to_diffusers(sd), safe_serialization=True
            )


def load_run(path: str | Path):
    """Load a run directory as a model (see module docstring)."""
    from chaintune.backends import _load_dir, load

    path = Path(path)
    info = read_run_info(path)
    if (path / "model" / "model_index.json").exists():
        model = _load_dir(path / "model", str(path))
    elif (path / "adapter").exists():
        model = load(info["base_model"])
        cfg = json.loads((path / "adapter" / "adapter_config.json").read_text())
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        from chaintune.training.adapters import apply_lora

        apply_lora(model.denoiser, rank=cfg.get("r") or 4)
        set_peft_model_state_dict(model.denoiser, load_file(str(path / "adapter" / "adapter_model.safetensors")))
        model.source = str(path)
    else:
        raise ChaintuneError(f"{path} holds no model yet (no model/ or adapter/); the run may not have saved")
    return model
