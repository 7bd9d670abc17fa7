"""scikit-learn's 8x8 handwritten digits as image tensors.

The split is fixed (seeded) so that the pretrained model, the shipped reward classifier and the
held-out evaluation classifier agree on which images are "train" and which are "test".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from chaintune.errors import ChaintuneError

DIGITS_SPLIT_SEED = 0


def digits_images(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as float images in [0, 1], shape [N, 1, size, size], and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


def digits_split(split: str, size: int = 8, test_fraction: float = 0.25):
    """The fixed ``'train'`` / ``'test'`` / ``'all'`` split of :func:`digits_images`."""
    x, y = digits_images(size)
    if split == "all":
        return x, y
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    idx = perm[n_test:] if split == "train" else perm[:n_test]
    if split not in ("train", "test"):
        raise ChaintuneError(f"split must be 'train', 'test' or 'all', got {split!r}")
    idx = torch.as_tensor(idx)
    return x[idx], y[idx]
