"""Which parameters train: full weights, LoRA (peft), BitFit, DiffFit.

Each ``apply_*`` freezes the denoiser and makes a chosen subset trainable, returning the list of
trainable parameter names, so trainers and tests can count exactly what moves.
"""

from __future__ import annotations

from torch import nn

from chaintune.errors import unknown_name

PEFT_METHODS = ("none", "lora", "bitfit", "difffit")

# attention projections across diffusers' UNet2DModel / UNet2DConditionModel / DiT / SD3 blocks
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def apply_full(denoiser: nn.Module) -> list[str]:
    denoiser.requires_grad_(True)
    return trainable_names(denoiser)


def apply_lora(denoiser: nn.Module, rank: int = 4, alpha: float | None = None,
               targets: list[str] | None = None, dropout: float = 0.0) -> list[str]:
    """Inject peft LoRA layers (A, B matrices) into the attention projections; only they train."""
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets or LORA_TARGETS,
                     lora_dropout=dropout, init_lora_weights="gaussian")
    denoiser.requires_grad_(False)
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(cfg)  # diffusers' PeftAdapterMixin: keeps save_lora_adapter/load_lora_weights
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(cfg, denoiser)
    names = [n for n, p in denoiser.named_parameters() if "lora_" in n]
    if not names:
        raise ValueError(f"LoRA found no target modules {cfg.target_modules} in {type(denoiser).__name__}")
    for n, p in denoiser.named_parameters():
        p.requires_grad_("lora_" in n)
    return trainable_names(denoiser)


def apply_bitfit(denoiser: nn.Module) -> list[str]:
    """Train only bias terms (BitFit, Ben Zaken et al. 2022)."""
    denoiser.requires_grad_(False)
    for n, p in denoiser.named_parameters():
        if n.endswith(".bias"):
            p.requires_grad_(True)
    return trainable_names(denoiser)


def apply_peft(denoiser: nn.Module, method: str, rank: int = 4) -> list[str]:
    if method == "none":
        return apply_full(denoiser)
    if method == "lora":
        return apply_lora(denoiser, rank=rank)
    if method == "bitfit":
        return apply_bitfit(denoiser)
    if method == "difffit":
        return apply_difffit(denoiser)

    raise unknown_name("peft method", method, PEFT_METHODS)


def apply_difffit(denoiser: nn.Module) -> list[str]:
    """DiffFit (Xie et al. 2023): biases, norms and embeddings, plus a learnable scale per block.

    Each ResNet block, attention and feed-forward block gets a scalar ``difffit_gamma`` (init 1)
    that scales its residual branch, x + gamma * f(x), as in the paper. It lives on the branch's
    output layer (``conv2`` / ``to_out.0`` / the last Linear of the MLP) and a forward hook that
    reads it from that layer multiplies the layer's output; keeping parameter and hook on the same
    module makes deep copies correct and lets ``chaintune.transfer.folding.fold_difffit`` fold
    gamma into the layer's weight and bias exactly (a plain diffusers module again for saving).
    Embeddings are the ``nn.Embedding`` tables (class labels); norms are GroupNorm/LayerNorm affines.
    """
    import torch

    def _difffit_hook(module, args, output):
        return output * module.difffit_gamma

    def branch_output(block: nn.Module) -> nn.Module | None:
        name = type(block).__name__
        if name.startswith("ResnetBlock") and isinstance(getattr(block, "conv2", None), nn.Conv2d):
            return block.conv2
        if name == "Attention" and hasattr(block, "to_out"):
            return block.to_out[0]
        if name == "FeedForward" and hasattr(block, "net"):
            linears = [m for m in block.net if isinstance(m, nn.Linear)]
            return linears[-1] if linears else None
        return None

    denoiser.requires_grad_(False)
    for block in list(denoiser.modules()):
        layer = branch_output(block)
        if layer is None or hasattr(layer, "difffit_gamma"):
            continue
        ref = next(layer.parameters())
        layer.register_parameter("difffit_gamma", nn.Parameter(torch.ones((), dtype=ref.dtype, device=ref.device)))
        layer.register_forward_hook(_difffit_hook)
    norms = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.InstanceNorm2d)
    for mod in denoiser.modules():
        if isinstance(mod, norms) or isinstance(mod, nn.Embedding):
            for p in mod.parameters(recurse=False):
                p.requires_grad_(True)
    for n, p in denoiser.named_parameters():
        if n.endswith(".bias") or n.endswith("difffit_gamma"):
            p.requires_grad_(True)
    return trainable_names(denoiser)


def lora_state_dict(denoiser: nn.Module) -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser)


def merge_lora(denoiser: nn.Module) -> nn.Module:
    """Fold LoRA deltas into the base weights and remove the adapter layers (plain diffusers module)."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(denoiser.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent_name, _, child = name.rpartition(".")
            parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
            setattr(parent, child, mod.get_base_layer())
    if hasattr(denoiser, "_hf_peft_config_loaded"):
        denoiser._hf_peft_config_loaded = False
        if hasattr(denoiser, "peft_config"):
            del denoiser.peft_config
    return denoiser
