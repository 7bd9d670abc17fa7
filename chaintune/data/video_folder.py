"""A folder of clips as a video dataset: animated GIF / WebP / APNG and ``.npy`` frame arrays.

Why: users transfer video models to their own clips. Every clip is brought to the model's shape: frames
resized (bicubic, antialiased, no cropping) to its height x width and converted to its channels, scaled to
[0, 1], and longer clips subsampled uniformly to its frame count (every ``n / F``-th frame, so motion keeps
a constant speed). Clips shorter than that are refused, never stretched.

Layout (as :mod:`chaintune.data.folder`): clips directly in the folder, or in class subfolders (one label
per subfolder, its name is the class name). A clip's prompt is a sidecar text file with the clip's name
and ``.txt``: ``walk.txt`` beside ``walk.gif``. Either every clip has one or none does; with prompts the
labels index the distinct prompts (:class:`~chaintune.data.registry.LabelledData` ``prompted``).

Problems are collected over the whole folder and raised as one error, so a user fixes it in one go.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chaintune.data.folder import list_images, listing
from chaintune.data.labelled import LabelledData
from chaintune.errors import ChaintuneError

CLIP_SUFFIXES = (".gif", ".webp", ".png", ".apng", ".npy")
PROMPT_SUFFIX = ".txt"


class _BadClip(Exception):
    """A clip that was read but cannot be used (its reason goes into the folder's one error)."""


class _TooShort(Exception):
    def __init__(self, frames: int):
        super().__init__(frames)
        self.frames = frames


def frame_indices(n: int, frames: int) -> list[int]:
    """``frames`` indices spread uniformly over ``n`` >= ``frames`` frames (a constant stride when it divides)."""
    return [i * n // frames for i in range(frames)]


def _pil_frame(im, channels: int, height: int, width: int) -> np.ndarray:
    """The current frame of ``im`` as [H, W, C] float32 in [0, 1] (transparency composited on black, as images)."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (width, height):
        im = im.resize((width, height), Image.BICUBIC, reducing_gap=None)
    a = np.asarray(im, dtype=np.float32) / 255.0
    return a[..., None] if a.ndim == 2 else a


def _read_pil(path: Path, frames: int, channels: int, height: int, width: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        n = int(getattr(im, "n_frames", 1))
        if n < frames:
            raise _TooShort(n)
        out = []
        for i in frame_indices(n, frames):
            im.seek(i)
            out.append(_pil_frame(im, channels, height, width))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def _read_npy(path: Path, frames: int, channels: int, height: int, width: int) -> torch.Tensor:
    """[F, H, W] or [F, H, W, C] (C = 1, 3 or 4: RGBA, composited on black), uint8 or float in [0, 1]."""
    import torch.nn.functional as F

    a = np.load(path, mmap_mode="r", allow_pickle=False)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
        raise _BadClip(f"shape {tuple(a.shape)}; a clip is [frames, H, W] or [frames, H, W, C] with C 1, 3 or 4")
    if a.dtype != np.uint8 and not np.issubdtype(a.dtype, np.floating):
        raise _BadClip(f"dtype {a.dtype}; a clip is uint8 or float in [0, 1]")
    if a.shape[0] < frames:
        raise _TooShort(int(a.shape[0]))
    sel = np.asarray(a[frame_indices(a.shape[0], frames)])  # reads only the frames kept
    if sel.dtype == np.uint8:
        x = torch.from_numpy(sel.astype(np.float32) / 255.0)
    else:
        x = torch.from_numpy(sel.astype(np.float32))
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 1:
            raise _BadClip(f"float values in [{lo:g}, {hi:g}]; float clips must be in [0, 1]")
    x = x.permute(0, 3, 1, 2)  # [F, c, h, w]
    if x.shape[1] == 4:
        x = x[:, :3] * x[:, 3:]
    if x.shape[1] == 3 and channels == 1:  # ITU-R 601-2 luma, what PIL's convert("L") uses for GIF frames
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] == 1 and channels != 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def _prompt(clip: Path) -> str | None:
    """The clip's sidecar prompt (whitespace collapsed to single spaces), or None without one."""
    side = clip.with_suffix(PROMPT_SUFFIX)
    if not side.is_file():
        return None
    return " ".join(side.read_text(encoding="utf-8").split())


def load_video_folder(path: str | Path, shape: tuple[int, int, int, int]) -> LabelledData:
    """Clips ``[N, F, C, H, W]`` in [0, 1] at ``shape`` = (frames, channels, height, width), labels and prompts.

    ``channels`` 1 gives grayscale (luma), anything else RGB (the caller matches other channel counts).
    """
    frames, channels, height, width = (int(v) for v in shape)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ChaintuneError(f"dataset folder {root} does not exist")
    files, labels, classes = list_images(root, CLIP_SUFFIXES, "clip")
    if not files:
        raise ChaintuneError(f"no clips ({', '.join(CLIP_SUFFIXES)}) found in {root}; other video files "
                             "(.mp4, ...) are not read: convert them to animated GIF/WebP or .npy frame arrays")
    x = torch.empty(len(files), frames, 1 if channels == 1 else 3, height, width)
    prompts: list[str | None] = []
    bad, short = [], []
    for k, f in enumerate(files):
        name = str(f.relative_to(root))
        try:
            read = _read_npy if f.suffix.lower() == ".npy" else _read_pil
            x[k] = read(f, frames, channels, height, width)
            prompts.append(_prompt(f))
        except _TooShort as e:
            short.append(f"{name} ({e.frames} frame{'s' * (e.frames != 1)})")
        except _BadClip as e:
            bad.append(f"{name} ({e})")
        except Exception as e:  # PIL, numpy and decoding raise several types for corrupt/unsupported files
            bad.append(f"{name} ({type(e).__name__})")
    problems = []
    if bad:
        problems.append(f"{len(bad)} unreadable clip file(s): {listing(bad)}")
    if short:
        problems.append(f"{len(short)} clip(s) shorter than the model's {frames} frames (longer clips are "
                        f"subsampled, shorter ones are not stretched): {listing(short)}")
    if problems:
        raise ChaintuneError(f"in {root}: " + " | ".join(problems))
    missing = [str(f.relative_to(root)) for f, p in zip(files, prompts, strict=True) if p is None]
    if missing and len(missing) < len(files):
        raise ChaintuneError(f"{len(missing)} of {len(files)} clips in {root} have no prompt file (NAME{PROMPT_SUFFIX} "
                             f"beside NAME.gif) while the others do: {listing(missing)}")
    if not missing:
        return LabelledData.from_prompts(x, prompts)
    return LabelledData(x, torch.tensor(labels, dtype=torch.long), classes or None)
