"""Transfer data and evaluation helpers: target images (or clips) at the model's size, held-out defaults, samples."""

from __future__ import annotations

import torch

from chaintune.backends.base import DiffusionModel
from chaintune.data import load_dataset
from chaintune.data.registry import CLASS_RANGE, LabelledData
from chaintune.errors import ChaintuneError
from chaintune.metrics import INCEPTION_ENV
from chaintune.sampling import sample


def pixel_spec(model: DiffusionModel) -> tuple[int, int]:
    """(channels, size) of the images a model is trained on (pixels, before any VAE)."""
    c, h, _ = model.pixel_shape
    return c, h


def video_spec(model: DiffusionModel) -> tuple[int, int, int, int] | None:
    """(frames, channels, height, width) of a video model's samples (its ``video_shape``); None for images."""
    if not model.produces_video:
        return None
    shape = getattr(model, "video_shape", None)
    if shape is None:
        raise ChaintuneError(f"{type(model).__name__} produces videos but declares no video_shape "
                             "(frames, channels, height, width), so its target clips cannot be sized")
    f, c, h, w = (int(v) for v in shape)
    return f, c, h, w


def _match_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    """Images [N, C, H, W] or videos [N, F, C, H, W] converted to ``c`` channels (dim -3)."""
    have = x.shape[-3]
    if have == c:
        return x
    if have == 1:
        return x.repeat_interleave(c, dim=-3)
    if c == 1:
        return x.mean(-3, keepdim=True)
    raise ChaintuneError(f"cannot convert {have}-channel images to {c} channels")


def load_target(model: DiffusionModel, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset ``name`` at the model's pixel size/channels, [0, 1]: images, or clips [N, F, C, H, W] at the
    ``video_shape`` of a model that produces videos (a :class:`LabelledData` carrying the clips' prompts)."""

    video = video_spec(model)
    c, size = pixel_spec(model) if video is None else (video[1], None)
    try:
        data = load_dataset(name, size=size) if video is None else load_dataset(name, video=video)
    except ChaintuneError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise ChaintuneError(f"dataset {name!r}: {e}") from e
    x, y = data
    x = _match_channels(x.float(), c)
    if isinstance(data, LabelledData):
        return LabelledData(x, y, data.classes, data.prompted)
    return x, y


@torch.no_grad()
def encode(model: DiffusionModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images in [0, 1] -> the denoiser's training space (pixels in [-1, 1] or VAE latents), once."""
    parts = [model.encode_images(images[i : i + batch_size].to(model.device, model.dtype))
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts).float()


def default_eval_data(data: str) -> str | None:
    """Held-out images for FID: the test split of a built-in dataset, nothing for a folder."""
    base = data.partition(":")[0]
    if base in ("digits", "digits-fewshot"):
        return "digits:test"
    m = CLASS_RANGE.match(base)
    if m:  # digits-AtoB / digits-fewshot-AtoB: the test split of the same classes
        return f"digits-{m.group(2)}to{m.group(3)}:test"
    if base == "glyphs":
        return "glyphs:test"
    return None


def hold_out(x: torch.Tensor, y: torch.Tensor, data: str, what: str = "--eval-data"):
    """(x, y, held-out images, their labels): the last 10% of ``data``'s images, taken out of training, for data
    without a test split of its own (a folder)."""
    k = max(1, len(x) // 10)
    if len(x) - k < 1:
        raise ChaintuneError(f"{data} has {len(x)} images: too few to hold some out; give {what}")
    return x[:-k], y[:-k], x[-k:], y[-k:]


def default_feature(data: str) -> str | None:
    import os

    base = data.partition(":")[0]
    if base in ("digits", "digits-fewshot", "glyphs") or CLASS_RANGE.match(base):
        return "digits-cnn"
    if os.environ.get(INCEPTION_ENV):
        return "inception"
    return None


def draw_labels(model: DiffusionModel, classes: torch.Tensor | None, n: int,
                generator: torch.Generator) -> torch.Tensor | None:
    """``n`` labels drawn with repetition from ``classes`` (so at their frequencies); None unless the
    model takes class labels and ``classes`` is non-empty."""
    if classes is None or not len(classes) or not model.takes_labels:
        return None
    return classes.long()[torch.randint(0, len(classes), (n,), generator=generator)]


@torch.no_grad()
def generate(model: DiffusionModel, n: int, steps: int, eta: float, seed: int, batch_size: int = 250, *,
             classes: torch.Tensor | None = None, guidance_scale: float | None = None,
             with_labels: bool = False, progress: str | None = None) -> torch.Tensor | tuple[torch.Tensor,
                                                                                            torch.Tensor | None]:
    """``n`` samples (images in [0, 1], CPU) with a fixed seed, so evaluations are comparable.

    ``classes``: for a class-conditional model, labels are drawn from these (with repetition, so
    passing the target's labels reproduces its class frequencies); default: all of the model's classes.
    ``with_labels``: also return the label each sample was drawn for (None: unconditional).
    """

    g = torch.Generator().manual_seed(seed)
    labels = draw_labels(model, classes, n, g)
    traj = sample(model, n, steps=steps, eta=eta, generator=g, batch_size=batch_size, labels=labels,
                  guidance_scale=guidance_scale, progress=progress)
    images = traj.images.float().cpu()
    if not with_labels:
        return images
    used = traj.conditions.get("labels") if traj.conditions else None
    return images, None if used is None else used.cpu()
