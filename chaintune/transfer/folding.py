"""Turn a DiffFit-adapted denoiser back into a plain diffusers module (for saving and loading).

Why: ``difffit_gamma`` scales the output of a linear/conv layer, so gamma * (W x + b) equals
(gamma W) x + gamma b; folding it makes the saved weights load in stock diffusers with the
exact same function, no hooks or extra keys.
"""

from __future__ import annotations

import torch
from torch import nn


def has_difffit(module: nn.Module) -> bool:
    return any(hasattr(m, "difffit_gamma") for m in module.modules())


@torch.no_grad()
def fold_difffit(module: nn.Module) -> nn.Module:
    """Fold every ``difffit_gamma`` into its layer's weight/bias and remove the hooks (in place)."""
    for layer in module.modules():
        if not hasattr(layer, "difffit_gamma"):
            continue
        gamma = layer.difffit_gamma.detach()
        layer.weight.mul_(gamma)
        if getattr(layer, "bias", None) is not None:
            layer.bias.mul_(gamma)
        for key, fn in list(layer._forward_hooks.items()):
            if getattr(fn, "__name__", "") == "_difffit_hook":
                del layer._forward_hooks[key]
        del layer._parameters["difffit_gamma"]
    return module
