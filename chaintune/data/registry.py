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

Video models ask :func:`resolve_video` instead, with their ``(frames, channels, height, width)``:

* ``moving-digits`` / ``moving-digits:train`` / ``moving-digits:test`` — one procedural clip per digit
  image of the fixed split (:mod:`chaintune.data.moving`), with a seeded motion and its prompt;
* a path to a folder of clips (:mod:`chaintune.data.video_folder`).

Clips come back as :class:`LabelledData`: the ``(videos, labels)`` pair that also carries the prompts.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from chaintune.data.digits import digits_split
from chaintune.data.folder import load_folder
from chaintune.data.fonts import glyph_images
from chaintune.data.labelled import LabelledData
from chaintune.data.moving import DIRECTIONS, SPEEDS, Motion, render
from chaintune.data.video_folder import load_video_folder
from chaintune.errors import ChaintuneError, unknown_name

FEWSHOT_SEED = 0
DATASET_IDS = ("digits", "digits:train", "digits:test", "glyphs", "glyphs:train", "glyphs:test", "digits-fewshot:K",
               "digits-AtoB:train", "digits-AtoB:test", "digits-fewshot-AtoB:K")
CLASS_RANGE = re.compile(r"^(digits|digits-fewshot)-(\d)to(\d)$")
VIDEO_DATASET_IDS = ("moving-digits", "moving-digits:train", "moving-digits:test")
MOVING_DIGITS_SEED = 0
"""Seed of the motions of ``moving-digits:SPLIT`` (fixed: a split is the same clips in every run)."""


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
            if arg not in ("", "train", "test", "all"):
                raise ChaintuneError(f"unknown split {arg!r} for {base}; use {base}:train or {base}:test")
            x, y = digits_split(arg or "all", size=size)
        else:
            x, y = _fewshot(name, arg, size)
        keep = (y >= lo) & (y <= hi)
        return x[keep], y[keep]
    if base == "glyphs":
        if arg not in ("", "train", "test", "all"):
            raise ChaintuneError(f"unknown split {arg!r} for glyphs; use glyphs, glyphs:train or glyphs:test")
        return glyph_images(arg or "all", size=size)
    if base == "digits-fewshot":
        return _fewshot(name, arg, size)
    if base == "moving-digits":
        raise ChaintuneError(f"{name!r} holds video clips; use it with a video model such as builtin:moving-digits")
    path = Path(name).expanduser()
    if path.is_dir():
        return load_folder(path, size)
    if path.exists():
        raise ChaintuneError(f"dataset {name!r} is a file; give a folder of images or a built-in id")

    raise unknown_name("dataset (and no such folder)", name, DATASET_IDS)


def _is_image_id(base: str) -> bool:
    return base in ("digits", "digits-fewshot", "glyphs") or CLASS_RANGE.match(base) is not None


def _moving_digits(name: str, split: str, shape: tuple[int, int, int, int]) -> LabelledData:
    """One clip per digit image of the split, moving as a seeded random prompt says, at the model's frames and
    square size (as ``chaintune pretrain`` renders them for ``builtin:moving-digits``)."""

    if split not in ("", "train", "test", "all"):
        raise ChaintuneError(f"unknown split {split!r} for moving-digits; use moving-digits:train or "
                             "moving-digits:test")
    frames, _, height, width = shape
    if height != width:
        raise ChaintuneError(f"{name!r} renders square clips; this model samples {height}x{width} frames")
    images, digits = digits_split(split or "all")
    g = torch.Generator().manual_seed(MOVING_DIGITS_SEED)
    directions, speeds = list(DIRECTIONS), list(SPEEDS.values())
    d = torch.randint(len(directions), (len(digits),), generator=g).tolist()
    s = torch.randint(len(speeds), (len(digits),), generator=g).tolist()
    motions = [Motion(int(k), directions[i], speeds[j]) for k, i, j in zip(digits.tolist(), d, s, strict=True)]
    clips = render(images, motions, frames=frames, canvas=height, generator=g)
    return LabelledData.from_prompts(clips, [m.prompt for m in motions])


def resolve_video(name: str, shape: tuple[int, int, int, int]) -> LabelledData:
    """Clips ``[N, F, C, H, W]`` in [0, 1] at a video model's ``shape`` = (frames, channels, height, width), with
    their labels and prompts (see module docstring); image ids are refused with the video ones to use."""
    base, _, arg = name.partition(":")
    if base == "moving-digits":
        return _moving_digits(name, arg, shape)
    path = Path(name).expanduser()
    if path.is_dir():
        return load_video_folder(path, shape)
    if path.exists():
        raise ChaintuneError(f"dataset {name!r} is a file; give a folder of clips or a built-in id")
    if _is_image_id(base):
        raise ChaintuneError(f"{name!r} holds images but this is a video model; give clips: moving-digits:train, "
                             "moving-digits:test or a folder of clips (GIF/WebP/APNG/.npy)")

    raise unknown_name("video dataset (and no such folder)", name, VIDEO_DATASET_IDS)
