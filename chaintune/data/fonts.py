"""Digits 0-9 rendered from the fonts that ship inside matplotlib (the ``glyphs`` dataset).

Why: an offline transfer benchmark needs a source domain with a real gap to scikit-learn's
handwritten digits but the same label space and format. Typeset digits from the DejaVu / STIX
fonts bundled with matplotlib are exactly that and need no download. Each image mimics the
sklearn preprocessing: a white glyph on black, size-normalised into a 32x32 box and
block-averaged to 8x8 (sklearn counts "on" pixels in 4x4 blocks).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chaintune.errors import ChaintuneError, InputFileNotFoundError

GLYPHS_SEED = 0
GLYPHS_PER_CLASS = 600
GLYPHS_TEST_FRACTION = 0.2
FONT_PREFIXES = ("DejaVuSans", "DejaVuSerif", "STIXGeneral")


def font_files() -> list[Path]:
    """The TTF fonts used for rendering (DejaVu and STIX families shipped with matplotlib)."""
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    files = sorted(p for p in ttf.glob("*.ttf") if p.name.startswith(FONT_PREFIXES) and "Display" not in p.name)
    if not files:
        raise InputFileNotFoundError(f"no DejaVu/STIX fonts found in {ttf}; is matplotlib installed completely? "
                                     "(pip install --force-reinstall matplotlib)")
    return files


@functools.lru_cache(maxsize=512)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def render_digit(digit: int, font_path: Path, rng: np.random.RandomState, canvas: int = 32) -> np.ndarray:
    """One glyph as a float [canvas, canvas] array in [0, 1], with random size/stroke/shift/rotation."""
    from PIL import Image, ImageDraw

    size = int(rng.randint(40, 64))
    font = _font(str(font_path), size)
    stroke = int(rng.choice([0, 0, 1, 2]))
    img = Image.new("L", (2 * size, 2 * size), 0)
    ImageDraw.Draw(img).text((size // 2, size // 4), str(digit), fill=255, font=font,
                             stroke_width=stroke, stroke_fill=255)
    img = img.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
    box = img.getbbox()
    if box is None:
        raise ChaintuneError(f"font {font_path} rendered an empty glyph for {digit}; the font file looks broken "
                             "(reinstall matplotlib)")
    glyph = img.crop(box)
    # size-normalise like the NIST preprocessing behind sklearn digits: longest side fills the box
    inner = int(rng.randint(canvas - 8, canvas - 1))
    w, h = glyph.size
    scale = inner / max(w, h)
    aspect = float(rng.uniform(0.85, 1.15))
    nw, nh = max(1, min(canvas, round(w * scale * aspect))), max(1, min(canvas, round(h * scale)))
    glyph = glyph.resize((nw, nh), Image.BILINEAR)
    out = Image.new("L", (canvas, canvas), 0)
    ox = (canvas - nw) // 2 + int(rng.randint(-2, 3))
    oy = (canvas - nh) // 2 + int(rng.randint(-2, 3))
    out.paste(glyph, (min(max(ox, 0), canvas - nw), min(max(oy, 0), canvas - nh)))
    return np.asarray(out, dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=2)
def _render_all(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.RandomState(seed)
    fonts = font_files()
    imgs, labels = [], []
    for d in range(10):
        for _ in range(per_class):
            imgs.append(render_digit(d, fonts[rng.randint(len(fonts))], rng))
            labels.append(d)
    x = torch.from_numpy(np.stack(imgs)).unsqueeze(1)
    x = F.avg_pool2d(x, 4)  # 32x32 -> 8x8 block average, like sklearn's 4x4 pixel counts
    x = (x / x.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)).clamp(0, 1)
    return x, torch.tensor(labels, dtype=torch.long)


def glyph_images(split: str = "all", size: int = 8, per_class: int = GLYPHS_PER_CLASS,
                 seed: int = GLYPHS_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered glyphs ``[N, 1, size, size]`` in [0, 1] and labels; ``split`` is train/test/all (fixed)."""
    if split not in ("all", "train", "test"):
        raise ChaintuneError(f"glyphs split must be 'train', 'test' or 'all', got {split!r}")
    x, y = _render_all(per_class, seed)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    if split == "all":
        return x.clone(), y.clone()
    perm = torch.from_numpy(np.random.RandomState(seed + 1).permutation(len(x)))
    n_test = int(round(len(x) * GLYPHS_TEST_FRACTION))
    idx = perm[n_test:] if split == "train" else perm[:n_test]
    return x[idx], y[idx]
