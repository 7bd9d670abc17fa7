"""Which parameters train: full weights, LoRA (peft), BitFit, DiffFit.

Each ``apply_*`` freezes the denoiser and makes a chosen subset trainable, returning the list of
trainable parameter names, so trainers and tests can count exactly what moves.
"""

from __future__ import annotations

from torch import nn

from chaintune.errors import ChaintuneError, unknown_name
from chaintune.utils.adapter_names import ATTENTION, FEED_FORWARD, LORA_TARGET_SETS, PEFT_METHODS, parse_lora_targets

LORA_TARGETS = list(ATTENTION)  # the default: attention projections of every diffusers block
_PEFT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the layer types peft's LoRA adapts here


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def apply_full(denoiser: nn.Module) -> list[str]:
    denoiser.requires_grad_(True)
    return trainable_names(denoiser)


def lora_target_layers(denoiser: nn.Module, spec: str | list[str]) -> list[str]:
    """The dotted names of the layers ``spec`` (``--lora-targets``, or peft target_modules) adapts in ``denoiser``.

    One input error where a named set finds nothing to adapt (a model without attention, or ``attention+ff`` on one
    without diffusers' FeedForward), or where a listed name matches no layer: the run would otherwise train a
    different set of layers than the user asked for, silently."""
    targets = parse_lora_targets(spec) if isinstance(spec, str) else list(spec)
    layers = [n for n, m in denoiser.named_modules() if isinstance(m, _PEFT_LAYERS)]

    def hits(target: str) -> list[str]:
        return [n for n in layers if n == target or n.endswith("." + target)]

    kind = type(denoiser).__name__
    if isinstance(spec, str) and spec.strip() in LORA_TARGET_SETS:
        groups = {"attention projections (to_q, to_k, to_v, to_out.0)": ATTENTION,
                  "feed-forward layers (diffusers' FeedForward: ff, ff_context, ffn)": FEED_FORWARD}
        for what, group in groups.items():
            if set(group) <= set(targets) and not any(hits(t) for t in group):
                raise ChaintuneError(f"lora_targets {spec.strip()!r}: {kind} has no {what}; choose other "
                                     f"--lora-targets (layer names) or another --peft")
    else:
        missing = [t for t in targets if not hits(t)]
        if missing:
            endings = sorted({n.rsplit(".", 1)[-1] for n in layers if not n.rsplit(".", 1)[-1].isdigit()})
            raise ChaintuneError(f"lora_targets: no layer of {kind} is named or ends with {', '.join(missing)}; its "
                                 f"layers end with e.g. {', '.join(endings[:12])}")
    return [n for n in layers if any(n == t or n.endswith("." + t) for t in targets)]


def apply_lora(denoiser: nn.Module, rank: int = 4, alpha: float | None = None,
               targets: str | list[str] | None = None, dropout: float = 0.0) -> list[str]:
    """Inject peft LoRA layers (A, B matrices) into the ``targets`` (default: the attention projections); only
    they train."""
    from peft import LoraConfig

    spec = targets or "attention"
    lora_target_layers(denoiser, spec)  # checked first: each named set or name must find its layers
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank,
                     target_modules=parse_lora_targets(spec) if isinstance(spec, str) else list(spec),
                     lora_dropout=dropout, init_lora_weights="gaussian")
    denoiser.requires_grad_(False)
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(cfg)  # diffusers' PeftAdapterMixin: keeps save_lora_adapter/load_lora_weights
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(cfg, denoiser)
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


def apply_peft(denoiser: nn.Module, method: str, rank: int = 4,
               lora_targets: str | list[str] = "attention") -> list[str]:
    if method == "none":
        return apply_full(denoiser)
    if method == "lora":
        return apply_lora(denoiser, rank=rank, targets=lora_targets)
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
