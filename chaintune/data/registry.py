"""Dataset ids beyond ``digits``: rendered glyphs, few-shot digits and image folders.

``chaintune.data.load_dataset`` delegates here. Ids:

* ``glyphs`` / ``glyphs:train`` / ``glyphs:test`` — digits rendered from matplotlib's fonts;
* ``digits-fewshot:K`` — K images per class from the fixed digits train split (fixed seed),
  the few-shot target of the transfer benchmark (held-out evaluation uses ``digits:test``);
* a path to a folder of images (optional class subfolders).
"""

from __future__ import annotations

from pathlib import Path

import torch

from chaintune.errors import ChaintuneError

FEWSHOT_SEED = 0
DATASET_IDS = ("digits", "digits:train", "digits:test", "glyphs", "glyphs:train", "glyphs:test", "digits-fewshot:K")


def fewshot_indices(labels: torch.Tensor, k: int, seed: int = FEWSHOT_SEED) -> torch.Tensor:
    """The first ``k`` indices of each class under a seeded permutation (nested: K=10 is inside K=50)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    out = []
    for c in torch.unique(labels).tolist():
        idx = perm[labels[perm] == c][:k]
        if len(idx) < k:
            raise ChaintuneError(f"digits-fewshot:{k}: class {c} has only {len(idx)} training images")
        out.append(idx)
    return torch.cat(out).sort().values


def resolve(name: str, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, C, size, size]`` in [0, 1] and labels for a dataset id (see module docstring)."""
    base, _, arg = name.partition(":")
    if base == "glyphs":
        from chaintune.data.fonts import glyph_images

        if arg not in ("", "train", "test", "all"):
            raise ChaintuneError(f"unknown split {arg!r} for glyphs; use glyphs, glyphs:train or glyphs:test")
        return glyph_images(arg or "all", size=size)
    if base == "digits-fewshot":
        from chaintune.data.digits import digits_split

        try:
            k = int(arg)
        except ValueError:
            raise ChaintuneError(f"digits-fewshot needs a shot count, e.g. digits-fewshot:10 (got {name!r})") from None
        if k < 1:
            raise ChaintuneError(f"digits-fewshot:K needs K >= 1, got {k}")
        x, y = digits_split("train", size=size)
        idx = fewshot_indices(y, k)
        return x[idx], y[idx]
    path = Path(name).expanduser()
    if path.is_dir():
        from chaintune.data.folder import load_folder

        return load_folder(path, size)
    if path.exists():
        raise ChaintuneError(f"dataset {name!r} is a file; give a folder of images or a built-in id")
    from chaintune.errors import unknown_name

    raise unknown_name("dataset (and no such folder)", name, DATASET_IDS)
