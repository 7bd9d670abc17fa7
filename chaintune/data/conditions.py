"""Condition extractors: control maps computed on the fly from plain images (no OpenCV, torch only).

They make ControlNets' controls (:mod:`chaintune.controlnet`) and are what the consistency rewards
(:mod:`chaintune.rewards.control`) apply to samples.

* ``edges``: Sobel gradient magnitude of the grey image, thresholded at ``EDGE_THRESHOLD`` of its
  per-image maximum (scale-free: the same map for a dim and a bright copy of an image). Binary {0, 1}.
* ``silhouette``: the object mask (grey > half the per-image maximum), average-pooled to a
  ``SILHOUETTE_CELLS``-per-side grid and brought back to full size bilinearly: a blurred, low-resolution
  shape that says where the digit is and how it is posed, not its strokes. Soft, in [0, 1].

Inputs (:func:`to_grey`): tensors in [0, 1] ([H, W], [C, H, W] or [N, C, H, W]), numpy arrays (uint8,
uint16 = 16-bit, floats in [0, 1]; [H, W] or [H, W, C]) and PIL images (L, I;16, I, F, RGB, RGBA, LA, P,
1). Grey is the channel mean for RGB (light digits on dark ground, as the built-in data); RGBA and LA
are composited over black (alpha 0 is background), so a transparent cut-out gives its own silhouette.
Anything else (0 or > 4 channels, empty, non-finite, out-of-range floats, wrong types) is a
:class:`~chaintune.errors.ChaintuneError` that says what was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from chaintune.errors import ChaintuneError, InputFileNotFoundError, unknown_name
from chaintune.utils.io import check_input_file

__all__ = ["CONDITIONS", "EDGE_THRESHOLD", "SILHOUETTE_CELLS", "to_grey", "edges", "silhouette", "extract",
           "load_condition_image", "condition_iou"]

EDGE_THRESHOLD = 0.25  # of the image's largest Sobel magnitude
SILHOUETTE_CELLS = 4  # the silhouette's resolution (cells per side) before it is blurred back to full size
CONDITIONS = ("edges", "silhouette")


def _alpha_over_black(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] with C in 1..4 -> [N, 1, H, W] grey (RGB mean; alpha composited over black)."""
    c = x.shape[1]
    if c in (2, 4):
        colour, alpha = x[:, :-1], x[:, -1:]
        return colour.mean(1, keepdim=True) * alpha
    return x.mean(1, keepdim=True)


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    if a.size == 0:
        raise ChaintuneError(f"condition image is empty (shape {a.shape})")
    if a.dtype == np.uint8:
        x = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        x = a.astype(np.float32) / 65535.0
    elif a.dtype == np.bool_:
        x = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):  # PIL "I" (32-bit) images: 16-bit data stored wide
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        x = a.astype(np.float32) / top
    else:
        raise ChaintuneError(f"condition image has unsupported dtype {a.dtype} (use uint8, uint16 or float)")
    if x.ndim == 2:
        return torch.from_numpy(x)[None, None]
    if x.ndim == 3:  # H, W, C
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    raise ChaintuneError(f"condition image array must be [H, W] or [H, W, C], got shape {a.shape}")


def _from_pil(im: Any) -> torch.Tensor:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return _from_numpy(np.asarray(im, dtype=np.uint16))
    elif mode == "I":
        return _from_numpy(np.asarray(im, dtype=np.int64))
    elif mode == "CMYK" or mode == "YCbCr" or mode == "LAB" or mode == "HSV":
        im = im.convert("RGB")
    return _from_numpy(np.asarray(im))


def to_grey(image: Any) -> torch.Tensor:
    """Grey images [N, 1, H, W] in [0, 1] from a tensor, numpy array or PIL image (see module docstring)."""
    if isinstance(image, (str, Path)):
        return load_condition_image(image)
    if isinstance(image, np.ndarray):
        x = _from_numpy(image)
    elif isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.dim() == 2:
            x = x[None, None]
        elif x.dim() == 3:
            x = x[None]
        elif x.dim() != 4:
            raise ChaintuneError(f"condition tensor must be [H, W], [C, H, W] or [N, C, H, W], got {tuple(x.shape)}")
        if x.numel() == 0:
            raise ChaintuneError(f"condition image is empty (shape {tuple(x.shape)})")
    elif hasattr(image, "mode") and hasattr(image, "size"):
        x = _from_pil(image)
    else:
        raise ChaintuneError(f"a condition image must be a tensor, numpy array, PIL image or path, got "
                             f"{type(image).__name__}")
    if not 1 <= x.shape[1] <= 4:
        raise ChaintuneError(f"condition image must have 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA) channels, "
                             f"got {x.shape[1]}")
    if not torch.isfinite(x).all():
        raise ChaintuneError("condition image has NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ChaintuneError(f"condition image values must lie in [0, 1] (floats) or be uint8/uint16, got range "
                             f"[{lo:.3g}, {hi:.3g}]")
    return _alpha_over_black(x.clamp(0, 1))


def load_condition_image(path: str | Path) -> torch.Tensor:
    """A PNG/JPEG/... file as grey [1, 1, H, W] (16-bit PNGs keep their 16 bits).

    Refused with one error naming the file: a missing path, a folder or a pipe (checked before it is opened: a
    pipe would block), a file PIL cannot read or decode (truncated), and an image of more pixels than PIL's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89M): decoding one would take gigabytes for a
    map that is resized to the model's few pixels anyway.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise InputFileNotFoundError(f"condition image {p} does not exist")
    check_input_file(p, "condition image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused, not warned
            with Image.open(p) as im:
                im.load()
                return to_grey(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ChaintuneError(f"condition image {p} is too large ({e}); give an image of at most "
                             f"{Image.MAX_IMAGE_PIXELS} pixels (it is resized to the model's size anyway)") from None
    except UnidentifiedImageError:
        raise ChaintuneError(f"{p} is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a damaged or truncated file
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a read error of the disk or a permission: reported as such
        raise ChaintuneError(f"condition image {p} cannot be decoded ({type(e).__name__}: {e}); the file is damaged "
                             "or truncated") from None


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edges(image: Any, threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """Binary Sobel edge map [N, 1, H, W] (1 where the gradient magnitude >= threshold * the image's max;
    a flat image has no edges)."""
    x = to_grey(image)
    k = torch.stack([_SOBEL, _SOBEL.t()])[:, None]
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
    mag = g.pow(2).sum(1, keepdim=True).sqrt()
    top = mag.flatten(1).amax(1).view(-1, 1, 1, 1)
    return ((mag >= threshold * top) & (top > 1e-6)).float()


def silhouette(image: Any, cells: int = SILHOUETTE_CELLS) -> torch.Tensor:
    """Blurred low-resolution object mask [N, 1, H, W] in [0, 1]: mask = grey > half the image's max,
    average-pooled to ``cells`` x ``cells`` and upsampled bilinearly (an empty image gives zeros)."""
    x = to_grey(image)
    top = x.flatten(1).amax(1).view(-1, 1, 1, 1)
    mask = ((x > 0.5 * top) & (top > 1e-6)).float()
    h, w = mask.shape[-2:]
    low = F.adaptive_avg_pool2d(mask, (min(cells, h), min(cells, w)))
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def extract(kind: str, image: Any) -> torch.Tensor:
    """The ``kind`` (edges | silhouette) condition map of ``image``."""
    if kind == "edges":
        return edges(image)
    if kind == "silhouette":
        return silhouette(image)
    raise unknown_name("condition", kind, CONDITIONS)


def condition_iou(kind: str, samples: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """Per-sample agreement with the condition: IoU of the condition extracted from each sample and the
    given condition map (maps binarised at 0.5; two empty maps agree, IoU 1)."""
    a = extract(kind, samples) > 0.5
    b = conditions.detach().cpu()[:, :1] > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
