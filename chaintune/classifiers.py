"""Small digit classifiers shipped with the package.

They serve three jobs offline: the ``digit:K`` reward (log-probability of class K), the feature
network for FID/KID on the built-in domains, and a held-out judge. ``digits-cnn`` is the reward
and feature network; ``digits-mlp`` is a second, differently built classifier that alignment
never sees, so a reward it confirms is not an artefact of one network (reward hacking).

Both take images in [0, 1] of any size, [n, 1 or 3, H, W], and resize to 8x8 internally.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from chaintune.data import digits_split
from chaintune.errors import InputFileNotFoundError, unknown_name
from chaintune.utils.io import atomic_file, save_json

CLASSIFIER_DIR = Path(__file__).resolve().parent / "assets" / "classifiers"
CLASSIFIERS = ("digits-cnn", "digits-mlp")


def _to_8x8(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (8, 8):
        x = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    return x * 2 - 1


class DigitCNN(nn.Module):
    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(_to_8x8(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class DigitMLP(nn.Module):
    feature_dim = 256

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(256, 256), nn.ReLU())
        self.head = nn.Linear(256, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(_to_8x8(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


_ARCH = {"digits-cnn": DigitCNN, "digits-mlp": DigitMLP}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 1-pixel shifts and mild noise: generated digits are not perfectly centred."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _junk(n: int, g: torch.Generator) -> torch.Tensor:
    """Off-manifold images (noise, blurred noise, noisy digits-like blobs) that are no digit at all.

    A reward classifier trained only on digits gives confident answers on noise, which alignment
    then exploits (adversarial pixels that "are a 3"); trained to answer uniform on junk, it does not.
    """
    kind = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blur = (blur - blur.amin((2, 3), keepdim=True)) / (blur.amax((2, 3), keepdim=True) - blur.amin((2, 3), keepdim=True)
                                                      + 1e-6)
    sparse = (torch.rand(n, 1, 8, 8, generator=g) < 0.3).float() * torch.rand(n, 1, 8, 8, generator=g)
    return torch.where(kind.view(-1, 1, 1, 1) == 0, x, torch.where(kind.view(-1, 1, 1, 1) == 1, blur, sparse))


def train_classifier(name: str, epochs: int = 60, seed: int = 0, junk_fraction: float = 0.25
                     ) -> tuple[nn.Module, float]:
    """Train ``name`` on the fixed digits train split; return it and its test accuracy.

    ``junk_fraction`` of each batch is off-manifold junk with a uniform target (see :func:`_junk`).
    """

    torch.manual_seed(seed)
    xtr, ytr = digits_split("train")
    xte, yte = digits_split("test")
    net = _ARCH[name]()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            b = perm[i : i + 64]
            loss = F.cross_entropy(net(_augment(xtr[b], g)), ytr[b], label_smoothing=0.05)
            if junk_fraction > 0:
                junk = _junk(max(1, int(len(b) * junk_fraction)), g)
                loss = loss + junk_fraction * -F.log_softmax(net(junk), 1).mean(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item()
    return net, acc


def save_classifier(net: nn.Module, name: str, accuracy: float, directory: Path = CLASSIFIER_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / f"{name}.safetensors", "wb") as f:
        f.write(_serialize(net))
    save_json(directory / f"{name}.json", {"name": name, "test_accuracy": accuracy})


def _serialize(net: nn.Module) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in net.state_dict().items()})


_CACHE: dict[str, nn.Module] = {}


def load_classifier(name: str = "digits-cnn") -> nn.Module:
    """A shipped classifier (frozen, eval mode). Cached per process."""
    if name not in _ARCH:
        raise unknown_name("classifier", name, _ARCH)
    if name not in _CACHE:
        path = CLASSIFIER_DIR / f"{name}.safetensors"
        if not path.exists():
            raise InputFileNotFoundError(f"classifier weights missing at {path} (an incomplete install?); rebuild "
                                         "them with chaintune.classifiers.train_classifier or reinstall chaintune")
        net = _ARCH[name]()
        net.load_state_dict(load_file(str(path)))
        net.eval().requires_grad_(False)
        _CACHE[name] = net
    return _CACHE[name]


def classifier_info(name: str) -> dict:
    return json.loads((CLASSIFIER_DIR / f"{name}.json").read_text())


__all__ = ["DigitCNN", "DigitMLP", "CLASSIFIERS", "train_classifier", "save_classifier", "load_classifier",
           "classifier_info", "save_file"]
