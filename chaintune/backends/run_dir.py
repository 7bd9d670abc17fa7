"""Reading a chaintune run directory as a model id (``chaintune.load("runs/X")``).

Writing runs is the trainers' business (``chaintune.run.rundir``); reading them lives here, beside
the other model loaders, so loading a model never imports the training package's run machinery.

A run holds ``chaintune_run.json`` (:data:`RUN_MARKER`) and either ``model/`` (the tuned model as a
diffusers pipeline, LoRA merged) or ``adapter/`` (peft-format LoRA weights over ``base_model``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chaintune.adapters import LORA_TARGETS, apply_lora, lora_target_layers
from chaintune.backends.files import check_safetensors, read_json, reading_model
from chaintune.errors import ChaintuneError

if TYPE_CHECKING:  # only for annotations: reading run metadata must not import torch
    from chaintune.backends.base import DiffusionModel

__all__ = ["RUN_MARKER", "is_run_dir", "read_run_info", "load_run"]

RUN_MARKER = "chaintune_run.json"


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_MARKER).is_file()


def read_run_info(path: str | Path) -> dict:
    """The run's ``chaintune_run.json`` (command, base model, peft method, resolved config, status)."""
    p = Path(path) / RUN_MARKER
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ChaintuneError(f"{p} is missing or corrupt: {e}") from e


def load_run(path: str | Path, load_model: Callable[[str], DiffusionModel]) -> DiffusionModel:
    """The tuned model of run ``path``: its ``model/`` when saved, else its base model plus ``adapter/``.

    ``load_model`` loads a model id (``chaintune.load``); it is passed in so that this module depends
    on nothing above it. The model's ``source`` is the run directory either way.
    """
    path = Path(path)
    info = read_run_info(path)
    if (path / "model" / "model_index.json").exists():
        model = load_model(str(path / "model"))
    elif (path / "adapter").exists():
        base = info.get("base_model") if isinstance(info, dict) else None
        if not isinstance(base, str) or not base:
            raise ChaintuneError(f"{path / RUN_MARKER} names no base_model for the run's adapter/; the run directory "
                                 "is damaged")
        model = load_model(base)
        _apply_adapter(model, path / "adapter")
    else:
        raise ChaintuneError(f"{path} holds no model yet (no model/ or adapter/); the run may not have saved")
    model.source = str(path)
    return model


def _apply_adapter(model: DiffusionModel, adapter: Path) -> None:
    """Inject LoRA layers of the saved rank and load the peft-format weights into them (files checked first, and
    what peft/safetensors raise reading them reported as one input error)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = read_json(adapter / "adapter_config.json")
    rank = cfg.get("r") or 4
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ChaintuneError(f"{adapter / 'adapter_config.json'}: r must be a rank >= 1, got {rank!r}")
    targets = cfg.get("target_modules") or LORA_TARGETS  # runs before --lora-targets adapted attention only
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise ChaintuneError(f"{adapter / 'adapter_config.json'}: target_modules must be a list of layer names")
    try:
        lora_target_layers(model.denoiser, targets)
    except ChaintuneError as e:
        raise ChaintuneError(f"{adapter / 'adapter_config.json'} does not fit the base model: {e}") from None
    weights = adapter / "adapter_model.safetensors"
    check_safetensors(weights)
    with reading_model(adapter):
        apply_lora(model.denoiser, rank=rank, targets=targets)
        set_peft_model_state_dict(model.denoiser, load_file(str(weights)))
