"""Transfer data and evaluation helpers: target images at the model's size, held-out defaults, samples."""

from __future__ import annotations

import torch

from chaintune.backends.base import DiffusionModel
from chaintune.data.registry import CLASS_RANGE
from chaintune.errors import ChaintuneError


def pixel_spec(model: DiffusionModel) -> tuple[int, int]:
    """(channels, size) of the images a model is trained on (pixels, before any VAE)."""
    c, h, _ = model.pixel_shape
    return c, h


def _match_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    if x.shape[1] == c:
        return x
    if x.shape[1] == 1:
        return x.repeat(1, c, 1, 1)
    if c == 1:
        return x.mean(1, keepdim=True)
    raise ChaintuneError(f"cannot convert {x.shape[1]}-channel images to {c} channels")


def load_target(model: DiffusionModel, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset ``name`` as images at the model's pixel size/channels, [0, 1]."""
    from chaintune.data import load_dataset

    c, size = pixel_spec(model)
    try:
        x, y = load_dataset(name, size=size)
    except ChaintuneError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise ChaintuneError(f"dataset {name!r}: {e}") from e
    return _match_channels(x.float(), c), y


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


def default_feature(data: str) -> str | None:
    import os

    from chaintune.metrics import INCEPTION_ENV

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
    from chaintune.sampling import sample

    g = torch.Generator().manual_seed(seed)
    labels = draw_labels(model, classes, n, g)
    traj = sample(model, n, steps=steps, eta=eta, generator=g, batch_size=batch_size, labels=labels,
                  guidance_scale=guidance_scale, progress=progress)
    images = traj.images.float().cpu()
    if not with_labels:
        return images
    used = traj.conditions.get("labels") if traj.conditions else None
    return images, None if used is None else used.cpu()
