"""The knowledge bank: samples of the pretrained model, generated once and reused across runs.

Why: Diff-Tuning's retention term needs data from the *source* distribution, but the source
data is usually not at hand; the pretrained model's own samples stand in for it (the official
code reads them from an image folder). Generating them is the expensive part, so a bank is
cached on disk under a key of everything that determines it (model and its weights, sampler,
steps, eta, guidance, labels/prompts, seed, count): ``bank.safetensors`` holds the decoded
images, the latents the denoiser sees and the labels; ``manifest.json`` records the settings.
A run whose settings match an existing manifest loads it instead of sampling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chaintune.backends.base import DiffusionModel
from chaintune.errors import ChaintuneError
from chaintune.sampling import sample
from chaintune.transfer.config import BankConfig
from chaintune.utils.io import atomic_dir, check_output_dir, save_json

__all__ = ["BankConfig", "KnowledgeBank", "build_bank", "default_bank_root", "model_fingerprint"]

BANK_FORMAT = 1


@dataclass
class KnowledgeBank:
    images: torch.Tensor  # [N, C, H, W] in [0, 1]
    latents: torch.Tensor  # [N, *latent_shape]: what the denoiser is trained on
    labels: torch.Tensor | None
    manifest: dict
    path: Path | None = None
    generated: bool = False  # False when loaded from the cache

    def __len__(self) -> int:
        return len(self.latents)


def default_bank_root() -> Path:
    """``$CHAINTUNE_CACHE/banks`` or ``~/.cache/chaintune/banks``."""
    root = os.environ.get("CHAINTUNE_CACHE") or Path.home() / ".cache" / "chaintune"
    return Path(root) / "banks"


def model_fingerprint(model: DiffusionModel, samples_per_tensor: int = 64) -> str:
    """A cheap hash of the denoiser's weights (strided sample of every tensor): a retrained model with
    the same id must not reuse an old bank, but hashing every byte of an SD UNet would take seconds."""
    h = hashlib.sha256()
    for name, p in sorted(model.denoiser.state_dict().items()):
        flat = p.detach().flatten()
        stride = max(1, flat.numel() // samples_per_tensor)
        h.update(name.encode())
        h.update(flat[::stride].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def bank_settings(model: DiffusionModel, cfg: BankConfig) -> dict:
    """Everything that determines a bank's content (the manifest minus bookkeeping); ``model_kind`` is
    recorded, but which of labels/prompts apply is the model's answer (``takes_labels``/``takes_prompts``)."""
    labels = cfg.labels if isinstance(cfg.labels, str) else [int(x) for x in cfg.labels]
    return {
        "format": BANK_FORMAT,
        "model_source": model.source,
        "model_kind": model.kind,
        "model_fingerprint": model_fingerprint(model),
        "sampler": cfg.scheduler,
        "steps": cfg.steps,
        "eta": cfg.eta,
        "guidance_scale": cfg.guidance_scale,
        "labels": labels if model.takes_labels else None,
        "prompts": list(cfg.prompts) if model.takes_prompts else None,
        "seed": cfg.seed,
        "count": cfg.size,
    }


def bank_dir(root: Path, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", settings["model_source"]).strip("-")[-40:] or "model"
    return root / f"{slug}-{key}"


def _bank_labels(model: DiffusionModel, cfg: BankConfig, g: torch.Generator) -> torch.Tensor | None:
    if not model.takes_labels:
        return None
    n_cls = model.num_classes
    if cfg.labels == "random":
        return torch.randint(0, n_cls, (cfg.size,), generator=g)
    if cfg.labels == "null":
        return None
    ids = torch.as_tensor([int(x) for x in cfg.labels], dtype=torch.long)
    if len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= n_cls:
        raise ChaintuneError(f"bank labels must be class ids in [0, {n_cls - 1}], got {cfg.labels}")
    return ids.repeat(cfg.size // len(ids) + 1)[: cfg.size]


def _generate(model: DiffusionModel, cfg: BankConfig,
              progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(cfg.seed)
    labels = _bank_labels(model, cfg, g)
    prompts = None
    if model.takes_prompts:
        p = list(cfg.prompts) or [""]
        prompts = (p * (cfg.size // len(p) + 1))[: cfg.size]
    traj = sample(model, cfg.size, steps=cfg.steps, eta=cfg.eta, generator=g, labels=labels, prompts=prompts,
                  guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler, batch_size=cfg.batch_size,
                  progress=f"knowledge bank ({cfg.size} samples)" if progress else None)
    return traj.images.detach().float().cpu(), traj.x0.detach().float().cpu(), labels


def _load(path: Path, manifest: dict) -> KnowledgeBank:
    from safetensors.torch import load_file

    t = load_file(str(path / "bank.safetensors"))
    return KnowledgeBank(t["images"], t["latents"], t.get("labels"), manifest, path, generated=False)


def build_bank(model: DiffusionModel, cfg: BankConfig | None = None, root: str | Path | None = None,
               *, regenerate: bool = False, progress: bool = False) -> KnowledgeBank:
    """Load the bank for (model, cfg) from ``root`` if its manifest matches, else sample and store it
    (``progress``: with a progress bar, since sampling is the slow part)."""
    from safetensors.torch import save_file

    cfg = cfg or BankConfig()
    if cfg.size < 1:
        raise ChaintuneError(f"bank size must be >= 1, got {cfg.size}")
    root = Path(root) if root is not None else default_bank_root()
    # before sampling: a cache path that is (or lies under) a file would fail only when the bank is written
    check_output_dir(root, flag="the knowledge-bank cache", fix="set CHAINTUNE_CACHE or --bank-dir to a folder")
    settings = bank_settings(model, cfg)
    path = bank_dir(root, settings)
    if not regenerate and (cached := _cached(path, settings)) is not None:
        return cached
    with _writing(path):  # one writer per bank: a second process waits, then finds the first one's bank
        if not regenerate and (cached := _cached(path, settings)) is not None:
            return cached
        images, latents, labels = _generate(model, cfg, progress)
        manifest = {**settings, "config": asdict(cfg), "image_shape": list(images.shape[1:]),
                    "latent_shape": list(latents.shape[1:])}
        tensors = {"images": images.contiguous(), "latents": latents.contiguous()}
        if labels is not None:
            tensors["labels"] = labels.contiguous()
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / "bank.safetensors"))
            save_json(tmp / "manifest.json", manifest)
    return KnowledgeBank(images, latents, labels, manifest, path, generated=True)


def _cached(path: Path, settings: dict) -> KnowledgeBank | None:
    """The bank stored at ``path`` when its manifest matches ``settings``; None (regenerate) when absent or corrupt."""
    mpath = path / "manifest.json"
    if not mpath.exists():
        return None
    try:
        manifest = json.loads(mpath.read_text())
        if {k: manifest.get(k) for k in settings} == settings:
            return _load(path, manifest)
    except (OSError, ValueError, KeyError):
        pass  # a corrupt cache entry is simply regenerated
    return None


@contextlib.contextmanager
def _writing(path: Path):
    """Hold an exclusive lock (``flock`` on ``.NAME.lock`` beside the bank, released by the kernel on any exit) and
    remove what killed writes of this bank left (``.NAME.*.tmp``, ``.NAME.old-*``): no live writer can own them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX: no lock, no cleanup
            yield
            return
        for leftover in [*path.parent.glob(f".{path.name}.*.tmp"), *path.parent.glob(f".{path.name}.old-*")]:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        yield
