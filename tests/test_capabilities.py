"""Backends declare what they take and make; transfer, banks and forgetting ask them instead of their kind."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch

import chaintune
from chaintune.backends.base import Conditions
from chaintune.testing import (
    tiny_dit_model,
    tiny_flow_model,
    tiny_flux_model,
    tiny_sd_model,
    tiny_sdxl_model,
    tiny_unet_model,
)
from chaintune.transfer import TransferConfig, transfer
from chaintune.transfer.forgetting import analyze

# name -> (factory, takes_labels, takes_prompts, null_label, decodes_latents, pixel_shape, diffusers LoRA format)
BACKENDS = {
    "unet": (tiny_unet_model, False, False, None, False, (1, 8, 8), False),
    "unet-classes": (lambda: tiny_unet_model(num_class_embeds=4), True, False, 3, False, (1, 8, 8), False),
    "sd": (tiny_sd_model, False, True, None, True, (3, 16, 16), True),
    "dit": (lambda: tiny_dit_model(num_classes=4), True, False, 4, True, (3, 16, 16), False),
    "flow": (tiny_flow_model, False, True, None, True, (3, 16, 16), True),
    "sdxl": (tiny_sdxl_model, False, True, None, True, (3, 16, 16), True),
    "flux": (tiny_flux_model, False, True, None, True, (3, 16, 16), True),
}


@pytest.mark.parametrize("name", BACKENDS)
def test_capability_answers(name, tmp_path):
    factory, labels, prompts, null_label, latents, pixels, lora = BACKENDS[name]
    m = factory()
    assert (m.takes_labels, m.class_conditional, m.takes_prompts) == (labels, labels, prompts)
    assert m.null_label == null_label
    assert m.has_null_branch == (prompts or null_label is not None)
    assert (m.decodes_latents, m.produces_video, tuple(m.pixel_shape)) == (latents, False, pixels)
    null = m.null_conditions(2)
    assert null.prompts == ([""] * 2 if prompts else None)
    assert (null.labels.tolist() if null.labels is not None else None) == ([null_label] * 2 if labels else None)
    with torch.no_grad():  # the null branch runs, and on pixels of pixel_shape
        x0 = m.encode_images(torch.rand(2, *m.pixel_shape))
        assert m.model_output(x0, torch.tensor([10, 900]), null).shape == x0.shape
    if not lora:  # no diffusers LoRA loader for this pipeline: nothing written (transfer writes peft format only)
        assert m.save_lora_weights(tmp_path, {}) is False and not any(tmp_path.iterdir())


def test_conditions_cat_joins_matching_parts_and_refuses_mixed_ones():
    a, b = Conditions(labels=torch.tensor([0, 1])), Conditions(labels=torch.tensor([3]))
    assert Conditions.cat([a, b]).labels.tolist() == [0, 1, 3]
    assert Conditions.cat([Conditions(prompts=["x"]), Conditions(prompts=[""])]).prompts == ["x", ""]
    with pytest.raises(ValueError, match="labels/prompts"):
        Conditions.cat([a, Conditions()])
    with pytest.raises(ValueError, match="extra"):
        Conditions.cat([Conditions(extra={"k": 1}), Conditions()])


def _kind_comparisons(path: Path) -> list[str]:
    """``x.kind`` compared (==, !=, in, not in) with a string or a collection of strings."""
    def strings(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str)
        return isinstance(node, ast.Tuple | ast.List | ast.Set) and any(strings(e) for e in node.elts)

    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "kind" for s in sides) and any(map(strings, sides)):
                hits.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return hits


def test_no_code_outside_backends_branches_on_a_backends_kind():
    root = Path(chaintune.__file__).resolve().parent
    hits = [h for p in sorted(root.rglob("*.py")) if "backends" not in p.relative_to(root).parts
            for h in _kind_comparisons(p)]
    assert not hits, ("code outside chaintune/backends/ compares a model's kind; ask a capability instead "
                      "(takes_labels, takes_prompts, null_conditions(n), has_null_branch, decodes_latents, "
                      "pixel_shape, save_lora_weights):\n" + "\n".join(hits))


def _cfg(tmp_path, method: str, **kw) -> TransferConfig:
    flat = dict(method=method, steps=3, batch_size=5, bank_share=0.4, bank_size=4, bank_steps=2,
                bank_dir=str(tmp_path / "banks"), eval_data=None, grid_samples=2, sample_steps=2, log_every=1)
    return TransferConfig.from_dict({**flat, **kw})


@pytest.mark.filterwarnings("ignore:Diff-Tuning's retention term:UserWarning")  # the unconditional UNet
@pytest.mark.parametrize("name", BACKENDS)
def test_transfer_and_forgetting_on_every_backend(name, tmp_path):
    """Both methods train with finite losses, the bank holds what the model takes, the run loads back as the
    same backend (LoRA runs also in diffusers' format where the pipeline has a loader), and the chain-of-
    forgetting analysis scores (base, tuned) with finite per-timestep losses."""
    factory, takes_labels, takes_prompts, _, _, _, lora_format = BACKENDS[name]
    base = factory()
    images, labels = torch.rand(6, *base.pixel_shape), torch.tensor([0, 1, 2, 0, 1, 2])
    peft = "lora" if lora_format else "none"  # LoRA needs attention layers, which the tiny UNets lack
    bank = None
    for method in ("diff-tuning", "plain"):
        run = tmp_path / method
        res = transfer(_cfg(tmp_path, method, peft=peft, lr=1e-2), model=factory(), target=(images, labels),
                       show_progress=False, out=run)
        assert all(math.isfinite(r["loss"]) for r in res.history), res.history
        if method == "diff-tuning":
            bank = res.bank
            assert bank is not None and len(bank) == 4
            assert (bank.labels is not None) == takes_labels
            assert (bank.manifest["labels"] is not None) == takes_labels
            assert bank.manifest["prompts"] == ([""] if takes_prompts else None)
        else:
            assert res.bank is None
        tuned = chaintune.load(run)
        assert type(tuned) is type(base) and tuned.source == str(run)
        if hasattr(base, "max_sequence_length"):  # tiny flow models use 8 T5 slots; a loaded one the default
            tuned.max_sequence_length = base.max_sequence_length
        if lora_format:  # the adapter also loads with the pipeline's own load_lora_weights
            assert (run / "adapter" / "pytorch_lora_weights.safetensors").exists()
            plain = factory()
            plain.pipe.load_lora_weights(str(run / "adapter"))
            x, t, c = torch.randn(2, *base.latent_shape), torch.tensor([300, 700]), base.null_conditions(2)
            with torch.no_grad():
                torch.testing.assert_close(plain.model_output(x, t, c), tuned.model_output(x, t, c),
                                           rtol=1e-4, atol=1e-5)
                assert not torch.allclose(base.model_output(x, t, c), tuned.model_output(x, t, c))
        result = analyze(base, tuned, images, bank.latents, num_timesteps=3, feature=None,
                         target_labels=labels if takes_labels else None)
        curves = [*result["target"].values(), *result["bank"].values(), result["forgetting"],
                  result["forgetting_x0"]]
        assert all(math.isfinite(v) for curve in curves for v in curve), result


def test_a_run_saved_as_an_adapter_only_loads_over_its_base(tmp_path):
    """The layout older versions wrote (chaintune_run.json + adapter/ over base_model) still loads."""
    from chaintune.adapters import apply_lora
    from chaintune.run.rundir import RUN_MARKER, _save_adapter, read_run_info, write_run_info

    base = tiny_flow_model()
    base.save(tmp_path / "base")
    tuned = tiny_flow_model()
    apply_lora(tuned.denoiser, rank=2)
    with torch.no_grad():
        for n, p in tuned.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    run = tmp_path / "run"
    run.mkdir()
    write_run_info(run, {"command": "transfer", "base_model": str(tmp_path / "base"), "peft": "lora"})
    _save_adapter(run / "adapter", tuned, 2)
    assert json.loads((run / RUN_MARKER).read_text())["peft"] == read_run_info(run)["peft"] == "lora"
    loaded = chaintune.load(run)
    loaded.max_sequence_length = tuned.max_sequence_length  # not saved by diffusers; tiny models use 8
    x, t, c = torch.randn(2, *base.latent_shape), torch.tensor([300, 700]), Conditions(prompts=["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model_output(x, t, c), tuned.model_output(x, t, c))
    assert loaded.source == str(run)
