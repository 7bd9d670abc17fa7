"""An image folder as a dataset: any size and mode, optional class subfolders.

Why: users transfer to their own images. Every file is converted to one channel layout,
resized to the model's resolution and scaled to [0, 1]; files PIL cannot read are collected and
reported together in one error, so a user fixes the folder in one go instead of one file a run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chaintune.errors import ChaintuneError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_images(root: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
                what: str = "image") -> tuple[list[Path], list[int], list[str]]:
    """Files with ``suffixes`` under ``root`` and their labels: one class per subfolder (its name is the class
    name), or label 0 for a flat folder. ``what`` names the files in the error for a folder that mixes both."""
    def matching(paths) -> list[Path]:
        return sorted(f for f in paths if f.is_file() and f.suffix.lower() in suffixes)

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    flat = matching(root.iterdir())
    if flat and subdirs:
        raise ChaintuneError(f"{root} mixes {what}s and class subfolders; put every {what} in a class folder")
    if flat:
        return flat, [0] * len(flat), []
    files, labels = [], []
    for k, d in enumerate(subdirs):
        found = matching(d.rglob("*"))
        files += found
        labels += [k] * len(found)
    return files, labels, [d.name for d in subdirs]


def listing(items: list[str], shown: int = 10) -> str:
    """The first ``shown`` problem files of a folder joined for one error line, the rest counted."""
    more = f"; ... {len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def load_folder(path: str | Path, size: int, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, C, size, size]`` in [0, 1] and labels from a folder.

    ``channels`` (1 or 3) forces the layout; by default it is 1 when every image is grayscale
    (modes L, LA, 1, I, I;16, F) and 3 otherwise. Images are resized (bicubic, antialiased) to a
    square ``size`` x ``size`` without cropping.
    """
    from PIL import Image

    root = Path(path).expanduser()
    if not root.is_dir():
        raise ChaintuneError(f"dataset folder {root} does not exist")
    files, labels, _ = list_images(root)
    if not files:
        raise ChaintuneError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
    pils, bad = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                pils.append(im.copy())
        except Exception as e:  # PIL raises several types for corrupt/unsupported files
            bad.append(f"{f} ({type(e).__name__})")
    if bad:
        raise ChaintuneError(f"{len(bad)} unreadable image file(s) in {root}: {listing(bad)}")
    gray_modes = {"1", "L", "LA", "I", "I;16", "F", "P"}
    if channels is None:
        channels = 1 if all(im.mode in gray_modes and _is_gray(im) for im in pils) else 3
    if channels not in (1, 3):
        raise ChaintuneError(f"channels must be 1 or 3, got {channels}")
    arrs = [_to_array(im, channels, size) for im in pils]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long)


def _is_gray(im) -> bool:
    if im.mode != "P":
        return True
    return im.convert("RGB").getextrema()[0] == im.convert("RGB").getextrema()[1]  # cheap palette check


def _to_array(im, channels: int, size: int) -> np.ndarray:
    from PIL import Image

    if im.mode in ("I", "I;16", "F"):
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        im = Image.fromarray(((a - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # composite transparency on black, matching the white-on-black convention of the built-in data
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, rgba)
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC, reducing_gap=None)
    a = np.asarray(im, dtype=np.float32) / 255.0
    return a[..., None] if a.ndim == 2 else a
