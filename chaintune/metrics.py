"""FID and KID through torchmetrics, with a pluggable feature network.

Why pluggable: Inception-v3 features mean nothing on 8x8 grayscale digits (and its weights are
a download), so for the built-in domains the features are those of the shipped digit
classifier (``digits-cnn``, 128-d penultimate layer), which is trained on real digits and sees
exactly the structure FID should compare. Inception is used only when the user points at its
weights on disk. Always compare generated images against *held-out* target images.

Feature specs: ``digits-cnn`` (default), ``digits-mlp``, ``inception:/path/to/weights``
(a TorchScript Inception such as ``inception-2015-12-05.pt``, or torch-fidelity's
``pt_inception-2015-12-05`` state dict when torch-fidelity is installed).

Loading an Inception file unpickles it (TorchScript archives hold pickles), which can run code from the
file, so ``inception:`` needs the same opt-in as pickled model weights: ``allow_pickle=True`` (CLI
``--allow-pickle``) or ``CHAINTUNE_ALLOW_PICKLE=1`` in the environment.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from chaintune.classifiers import load_classifier
from chaintune.data import digits_split
from chaintune.errors import ChaintuneError, unknown_name
from chaintune.utils.io import ALLOW_PICKLE_ENV, pickle_allowed

__all__ = ["FeatureNet", "feature_network", "fid_kid", "fid", "kid", "INCEPTION_ENV", "pairwise_diversity",
           "nearest_real_distance"]

INCEPTION_ENV = "CHAINTUNE_INCEPTION_WEIGHTS"


class FeatureNet(nn.Module):
    """Wrap a ``features(images) -> [n, d]`` network for torchmetrics (float images in [0, 1])."""

    def __init__(self, net: nn.Module, num_features: int, name: str, channels: int | None = None):
        super().__init__()
        self.net = net
        self.num_features = num_features
        self.name = name
        self.channels = channels

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if self.channels == 3 and images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        feats = self.net.features(images) if hasattr(self.net, "features") else self.net(images)
        return feats.float()


class _TorchScriptInception(nn.Module):
    """A TorchScript Inception (StyleGAN/clean-fid format): uint8 [n, 3, H, W] in, 2048-d pool features out."""

    def __init__(self, path: Path):
        super().__init__()
        self.model = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.model(x, return_features=True)


def _inception(path: str | None, allow_pickle: bool = False) -> nn.Module:
    path = path or os.environ.get(INCEPTION_ENV)
    if not path:
        raise ChaintuneError(
            "Inception FID needs its weights on disk (nothing is downloaded): pass --feature inception:/path/to/"
            f"inception-2015-12-05.pt or set {INCEPTION_ENV}; for the built-in digit/glyph domains use digits-cnn"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise ChaintuneError(f"Inception weights not found at {p}")
    if not pickle_allowed(allow_pickle):
        raise ChaintuneError(
            f"loading the Inception weights {p} unpickles the file, which can run code from it; if you trust it, "
            f"pass --allow-pickle (Python: allow_pickle=True) or set {ALLOW_PICKLE_ENV}=1 (any command)"
        )
    try:
        return FeatureNet(_TorchScriptInception(p), 2048, f"inception:{p}", channels=3)
    except (RuntimeError, ValueError):
        pass
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ChaintuneError(
            f"{p} is not a TorchScript Inception and torch-fidelity is not installed to read it as a state dict"
        ) from None

    class _Fidelity(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=str(p))

        def forward(self, images):
            return self.model((images.clamp(0, 1) * 255).round().to(torch.uint8))[0]

    return FeatureNet(_Fidelity(), 2048, f"inception:{p}", channels=3)


def feature_network(spec: str | nn.Module = "digits-cnn", allow_pickle: bool = False) -> FeatureNet:
    """Resolve a feature spec (see module docstring) or wrap a given module.

    ``allow_pickle`` opts in to ``inception:PATH``, whose loading runs code from the file (also
    ``CHAINTUNE_ALLOW_PICKLE=1``); the built-in ``digits-*`` networks are read from safetensors and need none.
    """
    if isinstance(spec, FeatureNet):
        return spec
    if isinstance(spec, nn.Module):
        with torch.no_grad():
            dim = (spec.features if hasattr(spec, "features") else spec)(torch.rand(2, 1, 8, 8)).shape[-1]
        return FeatureNet(spec, int(dim), type(spec).__name__)
    name, _, arg = spec.partition(":")
    if name in ("digits-cnn", "digits-mlp"):
        net = load_classifier(name)
        return FeatureNet(net, int(net.feature_dim), name)
    if name == "inception":
        return _inception(arg or None, allow_pickle)

    raise unknown_name("feature network", spec, ["digits-cnn", "digits-mlp", "inception:PATH"])


def _features(net: FeatureNet, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([net(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def fid_kid(real: torch.Tensor, fake: torch.Tensor, feature: str | nn.Module = "digits-cnn", *,
            kid_subsets: int = 50, kid_subset_size: int = 1000, batch_size: int = 256,
            seed: int = 0, allow_pickle: bool = False) -> dict[str, float]:
    """FID, KID (mean and std over subsets) between two image sets ``[n, C, H, W]`` in [0, 1].

    ``allow_pickle``: see :func:`feature_network`.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ChaintuneError(f"FID needs at least 2 images per set (got {len(real)} real, {len(fake)} fake)")
    net = feature_network(feature, allow_pickle=allow_pickle)
    # features are computed once and fed through an identity "network", so FID and KID share them
    fr, ff = _features(net, real.cpu(), batch_size), _features(net, fake.cpu(), batch_size)
    ident = FeatureNet(nn.Identity(), net.num_features, net.name)
    fid_m = FrechetInceptionDistance(feature=ident, normalize=True)
    fid_m.update(fr, real=True)
    fid_m.update(ff, real=False)
    size = min(kid_subset_size, len(fr), len(ff))
    with warnings.catch_warnings():  # "KID keeps all features in a buffer": intended, they are small here
        warnings.simplefilter("ignore", UserWarning)
        kid_m = KernelInceptionDistance(feature=ident, subsets=kid_subsets, subset_size=size, normalize=True)
    kid_m.update(fr, real=True)
    kid_m.update(ff, real=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws random subsets
    try:
        k_mean, k_std = kid_m.compute()
    finally:
        torch.random.set_rng_state(state)
    return {"fid": max(float(fid_m.compute()), 0.0), "kid": float(k_mean), "kid_std": float(k_std)}


def fid(real: torch.Tensor, fake: torch.Tensor, feature: str | nn.Module = "digits-cnn") -> float:
    return fid_kid(real, fake, feature, kid_subsets=1)["fid"]


def kid(real: torch.Tensor, fake: torch.Tensor, feature: str | nn.Module = "digits-cnn") -> float:
    return fid_kid(real, fake, feature)["kid"]


def pairwise_diversity(images: torch.Tensor) -> float:
    """Mean pairwise L2 distance between samples (per pixel): collapse to one image drives it to 0."""
    x = images.flatten(1).float()
    if len(x) < 2:
        return 0.0
    d = torch.cdist(x, x) / math.sqrt(x.shape[1])
    return float(d.sum() / (len(x) * (len(x) - 1)))


def nearest_real_distance(images: torch.Tensor) -> float:
    """Mean RMS pixel distance from each sample to its nearest real training digit (scikit-learn digits).

    Classifier rewards on 8x8 images are easy to fool with noise that a classifier calls a "3";
    samples that stay digits stay close to some real digit, so this rises when alignment hacks.
    """
    import torch.nn.functional as F

    real, _ = digits_split("train", 8)
    x = images.float().cpu()
    if x.shape[-1] != 8:
        x = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    d = torch.cdist(x.flatten(1), real.flatten(1)) / 8.0
    return float(d.min(1).values.mean())
