"""Saving images and grids (PNG) for samples, evaluations and reports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from chaintune.utils.io import atomic_file


def to_pil(img: torch.Tensor, upscale: int = 1) -> Image.Image:
    """[C, H, W] in [0, 1] -> PIL image (nearest-neighbour upscaling keeps tiny digits crisp)."""
    arr = (img.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    return pil


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> torch.Tensor:
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = images[i]
    return grid


def auto_upscale(h: int) -> int:
    return max(1, 64 // h) if h < 64 else 1


def save_video_grid(videos: torch.Tensor, path: str | Path, nrow: int | None = None, duration: int = 125) -> Path:
    """Write videos ``[n, F, C, H, W]`` as one animated GIF (frame f shows every clip's frame f in a grid)."""

    path = Path(path)
    v = videos.detach().float().cpu()
    up = auto_upscale(v.shape[-1])
    frames = [to_pil(make_grid(v[:, f], nrow=nrow), upscale=up) for f in range(v.shape[1])]
    with atomic_file(path, "wb") as fh:
        frames[0].save(fh, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
              captions: list[str] | None = None) -> Path:
    """Write a grid PNG atomically; tiny images are upscaled so the grid is readable. Videos
    ``[n, F, C, H, W]`` become one strip of frames per row, and an animated grid beside it (same name, .gif);
    ``captions`` (one per video, e.g. its prompt) are written left of each strip, so prompt-following can be
    checked by eye."""

    path = Path(path)
    rows = None
    if images.dim() == 5:
        save_video_grid(images, path.with_suffix(".gif"))
        rows = images.shape[0]
        nrow, images = images.shape[1], images.flatten(0, 1)
    grid = make_grid(images.detach().float().cpu(), nrow=nrow)
    pil = to_pil(grid, upscale=auto_upscale(images.shape[-1]) // 2 or 1)
    if captions is not None and rows is not None:
        pil = caption_rows(pil, [str(c) for c in captions[:rows]], rows)
    with atomic_file(path, "wb") as f:
        pil.save(f, format="PNG")
    return path


def caption_rows(pil: Image.Image, captions: list[str], rows: int, size: int = 11) -> Image.Image:
    """``pil`` with a white margin on the left holding ``captions[r]`` beside row r of its ``rows`` rows (DejaVu
    Sans from matplotlib, PIL's bitmap font where that is missing)."""
    from PIL import ImageDraw, ImageFont

    try:
        import matplotlib

        font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(pil)
    width = max((int(draw.textlength(c, font=font)) for c in captions), default=0) + 8
    out = Image.new(pil.mode, (pil.width + width, pil.height), 255 if pil.mode == "L" else (255, 255, 255))
    out.paste(pil, (width, 0))
    draw, row_h = ImageDraw.Draw(out), pil.height / rows
    for r, text in enumerate(captions):
        draw.text((4, (r + 0.5) * row_h), text, fill=0 if out.mode == "L" else (0, 0, 0), font=font, anchor="lm")
    return out


def save_images(images: torch.Tensor, directory: str | Path, prefix: str = "sample") -> list[Path]:
    """One PNG per image; a video ``[F, C, H, W]`` becomes an animated GIF (and its frames a PNG strip)."""

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i, img in enumerate(images):
        p = directory / f"{prefix}_{i:04d}.png"
        if img.dim() == 4:  # a video: the strip as PNG, the clip as GIF beside it
            frames = [to_pil(f, upscale=auto_upscale(f.shape[-1])) for f in img]
            gif = p.with_suffix(".gif")
            with atomic_file(gif, "wb") as f:
                frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=125, loop=0)
            out.append(gif)
            img = make_grid(img.detach().float().cpu(), nrow=len(img))
        with atomic_file(p, "wb") as f:
            to_pil(img).save(f, format="PNG")
        out.append(p)
    return out
