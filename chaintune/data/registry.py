"""Dataset ids beyond ``digits``: rendered glyphs, few-shot digits and image folders.

``chaintune.data.load_dataset`` delegates here. Ids:

* ``glyphs`` / ``glyphs:train`` / ``glyphs:test`` — digits rendered from matplotlib's fonts;
* ``digits-fewshot:K`` — K images per class from the fixed digits train split (fixed seed),
  the few-shot target of the transfer benchmark (held-out evaluation uses ``digits:test``);
* ``digits-AtoB`` / ``digits-AtoB:train`` / ``digits-AtoB:test`` — the digits (same fixed split)
  of classes A..B only, e.g. ``digits-0to4:train``; labels keep their digit values;
* ``digits-fewshot-AtoB:K`` — ``digits-fewshot:K`` restricted to classes A..B (the same images:
  a class-split transfer benchmark pretrains on ``digits-0to4:train`` and adapts to
  ``digits-fewshot-5to9:K``, evaluated on ``digits-5to9:test``);
* a path to a folder of images (optional class subfolders).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from chaintune.errors import ChaintuneError

FEWSHOT_SEED = 0
DATASET_IDS = ("digits", "digits:train", "digits:test", "glyphs", "glyphs:train", "glyphs:test", "digits-fewshot:K",
               "digits-AtoB:train", "digits-AtoB:test", "digits-fewshot-AtoB:K")
CLASS_RANGE = re.compile(r"^(digits|digits-fewshot)-(\d)to(\d)$")


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


def _fewshot(name: str, arg: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from chaintune.data.digits import digits_split

    try:
        k = int(arg)
    except ValueError:
        raise ChaintuneError(f"{name.partition(':')[0]} needs a shot count, e.g. digits-fewshot:10 "
                             f"(got {name!r})") from None
    if k < 1:
        raise ChaintuneError(f"digits-fewshot:K needs K >= 1, got {k}")
    x, y = digits_split("train", size=size)
    idx = fewshot_indices(y, k)
    return x[idx], y[idx]


def resolve(name: str, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, C, size, size]`` in [0, 1] and labels for a dataset id (see module docstring)."""
    base, _, arg = name.partition(":")
    m = CLASS_RANGE.match(base)
    if m:
        lo, hi = int(m.group(2)), int(m.group(3))
        if lo > hi:
            raise ChaintuneError(f"{name!r}: class range {lo}to{hi} is empty; write e.g. digits-5to9")
        if m.group(1) == "digits":
            from chaintune.data.digits import digits_split

            if arg not in ("", "train", "test", "all"):
                raise ChaintuneError(f"unknown split {arg!r} for {base}; use {base}:train or {base}:test")
            x, y = digits_split(arg or "all", size=size)
        else:
            x, y = _fewshot(name, arg, size)
        keep = (y >= lo) & (y <= hi)
        return x[keep], y[keep]
    if base == "glyphs":
        from chaintune.data.fonts import glyph_images

        if arg not in ("", "train", "test", "all"):
            raise ChaintuneError(f"unknown split {arg!r} for glyphs; use glyphs, glyphs:train or glyphs:test")
        return glyph_images(arg or "all", size=size)
    if base == "digits-fewshot":
        return _fewshot(name, arg, size)
    path = Path(name).expanduser()
    if path.is_dir():
        from chaintune.data.folder import load_folder

        return load_folder(path, size)
    if path.exists():
        raise ChaintuneError(f"dataset {name!r} is a file; give a folder of images or a built-in id")
    from chaintune.errors import unknown_name

    raise unknown_name("dataset (and no such folder)", name, DATASET_IDS)
