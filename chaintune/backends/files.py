"""A model folder's files, checked before diffusers or transformers read them, and the errors of that reading.

A folder is a model when its top level says so: ``model_index.json`` (a pipeline, whose components are the
subfolders it names) or ``config.json`` (one model). Nothing below the components is ever walked, so a wrong
``--model /`` fails at once instead of listing the whole disk.

:func:`check_model_dir` reads what the libraries would read and refuses, with one error naming the file:

* a JSON file (``model_index.json``, a component's ``config.json`` ...) that does not parse;
* a component whose weights would load from a pickle (pickles run code) without the opt-in. What loads is
  decided per component as the libraries decide it: diffusers reads ``diffusion_pytorch_model.safetensors``
  (or its sharded ``.index.json``) and otherwise falls back to ``diffusion_pytorch_model.bin``; transformers
  reads ``model.safetensors`` and falls back to ``pytorch_model.bin``. Another ``.safetensors`` file beside a
  pickle (a decoy, a ``fp16`` variant) is never what loads, so it makes nothing safe;
* a ``.safetensors`` file that would load but is truncated or whose header is not safetensors.

:func:`reading_model` turns whatever the libraries still raise while loading (weights whose shapes do not fit the
config, a config with impossible values, a missing file) into one input error naming the folder, and the weight
file when the error names a tensor.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chaintune.errors import ChaintuneError
from chaintune.utils.io import ALLOW_PICKLE_ENV, check_input_file, pickle_allowed

__all__ = ["PICKLE_SUFFIXES", "WEIGHTS", "Component", "components", "is_model_dir", "check_model_dir",
           "check_safe_weights", "check_safetensors", "read_json", "reading_model"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# library -> the safetensors files its from_pretrained reads, in its order of preference (no variant=)
WEIGHTS = {
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    "transformers": ("model.safetensors", "model.safetensors.index.json"),
}

HEADER_LIMIT = 100 << 20  # the safetensors format's own cap on a header


@dataclass(frozen=True)
class Component:
    """One folder a library loads on its own: ``unet/`` of a pipeline, or a bare model folder (``name`` "")."""

    name: str
    folder: Path
    library: str | None  # "diffusers", "transformers"; None when the folder does not say
    cls: str | None = None  # the library's class that loads it ("UNet2DConditionModel"), when the folder says

    def where(self, root: Path) -> str:
        """``unet/ of ROOT`` for a component, ``ROOT`` for a bare model (how messages name it)."""
        return f"{self.name}/ of {root}" if self.name else str(root)


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` is a model folder by its top level (``model_index.json`` or ``config.json``)."""
    return (path / "model_index.json").is_file() or (path / "config.json").is_file()


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or one error naming the file (a pipe or device is refused unopened)."""

    check_input_file(path, "model file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ChaintuneError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); the model folder is "
                             "damaged") from None
    except json.JSONDecodeError as e:
        raise ChaintuneError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); the model "
                             "folder is damaged") from None
    except RecursionError:  # json recurses once per nesting level
        raise ChaintuneError(f"{path} is nested too deeply to be a model's JSON file; the model folder is "
                             "damaged") from None
    if not isinstance(data, dict):
        raise ChaintuneError(f"{path} must hold a JSON object, got a {type(data).__name__}; the model folder is "
                             "damaged")
    return data


def components(path: Path) -> list[Component]:
    """The folders the libraries load for model folder ``path``: the components ``model_index.json`` names
    (with their library), the folder itself for a ``config.json`` model, or, for a folder that says neither,
    the folder and its immediate subfolders (library unknown)."""
    index = path / "model_index.json"
    if index.is_file():
        out = []
        for name, entry in read_json(index).items():
            if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
                continue  # private keys, plain settings, and components saved as null
            if not isinstance(entry[0], str) or "/" in name or name in (".", ".."):
                raise ChaintuneError(f"{index}: component {name!r} is not a [library, class] pair of names; the "
                                     "model folder is damaged")
            out.append(Component(name, path / name, entry[0], entry[1] if isinstance(entry[1], str) else None))
        return out
    config = path / "config.json"
    if config.is_file():
        cfg = read_json(config)
        if isinstance(cfg.get("_class_name"), str):
            return [Component("", path, "diffusers", cfg["_class_name"])]
        archs = cfg.get("architectures")
        cls = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
        return [Component("", path, "transformers" if "model_type" in cfg else None, cls)]
    subfolders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [Component("", path, None), *(Component(p.name, p, None) for p in subfolders)]


def _chosen_weights(c: Component) -> Path | None:
    """The safetensors file (or shard index) the component's library would load; None if it holds none."""
    names = WEIGHTS[c.library] if c.library in WEIGHTS else tuple(n for ns in WEIGHTS.values() for n in ns)
    return next((c.folder / n for n in names if (c.folder / n).is_file()), None)


def check_safe_weights(path: Path, allow_pickle: bool = False) -> None:
    """Refuse a model folder where some component would load its weights from a pickle (loading a pickle can
    run code), unless ``allow_pickle`` or ``CHAINTUNE_ALLOW_PICKLE=1``. Per component, as its library chooses
    (module docstring): a pickle-format file with none of the library's safetensors names beside it loads."""

    if pickle_allowed(allow_pickle) or not path.is_dir():
        return
    for c in components(path):
        if not c.folder.is_dir() or _chosen_weights(c) is not None:
            continue
        pickles = sorted(f.name for f in c.folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
        if pickles:
            wanted = WEIGHTS[c.library][0] if c.library in WEIGHTS else " or ".join(n for n, _ in WEIGHTS.values())
            raise ChaintuneError(
                f"{c.where(path)} would load pickled weights ({pickles[0]}: there is no {wanted} beside it, and no "
                "other .safetensors file is read in its place), and loading a pickle can run code; chaintune loads "
                f"safetensors. Convert them, or if you trust the files pass --allow-pickle (Python: "
                f"allow_pickle=True) or set {ALLOW_PICKLE_ENV}=1"
            )


def check_safetensors(path: Path) -> dict:
    """The header of safetensors file ``path`` (tensor name -> dtype, shape, offsets), after checking that the
    file holds every byte the header describes; one error naming the file otherwise. Reads the header only."""
    if not path.is_file():
        raise ChaintuneError(f"{path} is missing; the model folder is incomplete")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > min(HEADER_LIMIT, size - 8):
            raise ChaintuneError(f"{path} is not a complete safetensors file ({size} bytes, too short for the header "
                                 "it announces); the download or copy was cut off, or it is another format")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ChaintuneError(f"{path} is not a safetensors file (its header does not parse); the model folder is "
                             "damaged") from None
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise ChaintuneError(f"{path} is truncated: it holds {size} bytes and its header describes {need}; the "
                             "download or copy was cut off")
    return header


def _weight_files(chosen: Path) -> list[Path]:
    """The safetensors files behind ``chosen``: itself, or the shards its index names."""
    if not chosen.name.endswith(".index.json"):
        return [chosen]
    weight_map = read_json(chosen).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ChaintuneError(f"{chosen} has no weight_map; the model folder is damaged")
    shards = sorted({str(v) for v in weight_map.values()})
    if any("/" in s or s in (".", "..") for s in shards):
        raise ChaintuneError(f"{chosen} names shards outside its folder; the model folder is damaged")
    return [chosen.parent / s for s in shards]


def check_model_dir(path: Path, allow_pickle: bool = False) -> None:
    """Everything about model folder ``path`` that can be told without building the model (module docstring):
    its JSON files parse, no component loads a pickle without the opt-in, every component named exists, and the
    safetensors files that load are complete. One :class:`ChaintuneError` naming the file otherwise."""
    for f in sorted(path.glob("*.json")):
        read_json(f)
    check_safe_weights(path, allow_pickle)
    for c in components(path):
        if not c.folder.is_dir():
            raise ChaintuneError(f"{path / 'model_index.json'} names the component {c.name!r}, but {c.folder} is "
                                 "missing; the model folder is incomplete")
        if c.folder != path:
            for f in sorted(c.folder.glob("*.json")):
                read_json(f)
        chosen = _chosen_weights(c)
        if chosen is not None:
            for f in _weight_files(chosen):
                check_safetensors(f)
        elif c.library == "diffusers" and (c.folder / "config.json").is_file() and \
                not any(f.suffix in PICKLE_SUFFIXES for f in c.folder.iterdir()):
            # a diffusers model (schedulers keep scheduler_config.json) with nothing to load: diffusers would say
            # so only after a warning line of its own
            raise ChaintuneError(f"{c.where(path)} has no weights ({WEIGHTS['diffusers'][0]}); the model folder is "
                                 "incomplete")


# (top-level package, function): frames of the library calls that read a model folder's files
_READERS = {("diffusers", "from_pretrained"), ("diffusers", "load_config"), ("transformers", "from_pretrained"),
            ("peft", "from_pretrained"), ("peft", "set_peft_model_state_dict"), ("safetensors", "load_file")}


def _raised_while_reading(e: BaseException) -> bool:
    """Whether ``e`` was raised inside a library call that reads model files (a frame of :data:`_READERS` on its
    traceback): then it is about the files, not about chaintune's code around the call."""
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        package = str(frame.f_globals.get("__name__", "")).partition(".")[0]
        if (package, frame.f_code.co_name) in _READERS:
            return True
        tb = tb.tb_next
    return False


def _mismatch(root: Path) -> str | None:
    """Which weight file of model folder ``root`` does not fit the model its config describes, said in one
    sentence; None when every one fits (or that cannot be told). Each component is built on the meta device (no
    memory, no weights) from its config and its parameter shapes are compared with the safetensors headers: the
    libraries' own messages do not name the file, and transformers' not even the tensor."""
    import importlib

    import torch

    for c in components(root):
        chosen = _chosen_weights(c) if c.folder.is_dir() and c.library in WEIGHTS and c.cls else None
        if chosen is None:
            continue
        try:
            klass = getattr(importlib.import_module(c.library), c.cls)
            with torch.device("meta"):
                if c.library == "diffusers":
                    model = klass.from_config(klass.load_config(c.folder))
                else:
                    model = klass(klass.config_class.from_pretrained(c.folder))
            shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
            for f in _weight_files(chosen):
                for name, entry in check_safetensors(f).items():
                    if name in shapes and isinstance(entry, dict) and entry.get("shape") != shapes[name]:
                        return (f"{f} does not fit {c.folder / 'config.json'}: {name} has shape {entry.get('shape')} "
                                f"in the file and {shapes[name]} in the model the config describes")
        except Exception:  # noqa: BLE001 - a diagnosis only: the caller reports the library's own error instead
            continue
    return None


@contextlib.contextmanager
def reading_model(path: Path) -> Iterator[None]:
    """Run a backend's loading of model folder ``path``; an error diffusers, transformers, peft or safetensors
    raise while reading its files becomes one :class:`ChaintuneError` naming the folder (and the weight file of
    a shape mismatch). Errors raised elsewhere (chaintune's own code) pass through: they are bugs, not input."""
    try:
        yield
    except ChaintuneError:
        raise
    except Exception as e:
        if not _raised_while_reading(e):
            raise
        # the first sentence: what went wrong (diffusers goes on with options of its own from_pretrained)
        message = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(f"{type(e).__name__}: {e}".split()), maxsplit=1)[0]
        if len(message) > 300:
            message = message[:300] + "..."
        mismatch = _mismatch(Path(path))
        if mismatch is not None:
            raise ChaintuneError(f"{mismatch} (the folder mixes files of different models)") from e
        raise ChaintuneError(f"the model in {path} does not load: {message} (the folder is damaged or mixes files of "
                             "different models; CHAINTUNE_DEBUG=1 shows the traceback)") from e
