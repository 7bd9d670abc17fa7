"""--lora-targets: which layers LoRA adapts (attention, attention + feed-forward, or names), saved with the run,
loaded back by chaintune.load and by diffusers' own load_lora_weights onto the same layers."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import chaintune
from chaintune.adapters import apply_lora, lora_target_layers
from chaintune.cli.main import main
from chaintune.errors import ChaintuneError
from chaintune.run.rundir import save_tuned_model
from chaintune.testing import tiny_sd_model, tiny_unet_model, tiny_wan_model
from chaintune.transfer import TransferConfig, transfer
from chaintune.utils.adapter_names import parse_lora_targets


def _adapted(denoiser) -> set[str]:
    return {n.split(".lora_")[0] for n, _ in denoiser.named_parameters() if ".lora_" in n}


def test_named_sets_and_lists_parse_and_bad_ones_are_one_input_error():
    assert parse_lora_targets("attention") == ["to_q", "to_k", "to_v", "to_out.0"]
    assert {"ff.net.0.proj", "ff.net.2", "ffn.net.2", "ff_context.net.2"} <= set(parse_lora_targets("attention+ff"))
    assert parse_lora_targets(" to_q, ff.net.2 ,to_q") == ["to_q", "ff.net.2"]
    for bad in ("", "to_q,", "to q", "../x", "to_q;rm"):
        with pytest.raises(ChaintuneError, match="lora_targets must be"):
            parse_lora_targets(bad)


def test_attention_plus_ff_adapts_every_feed_forward_linear_of_sd_and_wan():
    for model, ff in ((tiny_sd_model(), ".ff.net."), (tiny_wan_model(), ".ffn.net.")):
        den = model.denoiser
        linears = {n for n, m in den.named_modules() if isinstance(m, torch.nn.Linear)}
        want_ff = {n for n in linears if ff in n}
        assert want_ff, "the tiny model has feed-forward layers"
        apply_lora(den, rank=2, targets="attention+ff")
        got = _adapted(den)
        assert want_ff <= got
        attention = {n for n in linears if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0")}
        assert got == want_ff | attention
    default = tiny_sd_model().denoiser  # the default set leaves the feed-forward layers alone
    apply_lora(default, rank=2)
    assert _adapted(default) and not any(".ff." in n for n in _adapted(default))


def test_a_list_of_names_adapts_exactly_those_and_unknown_names_are_named():
    den = tiny_sd_model().denoiser
    apply_lora(den, rank=2, targets="to_q,ff.net.2")
    got = _adapted(den)
    assert got and all(n.endswith(".to_q") or n.endswith(".ff.net.2") for n in got)
    assert any(n.endswith(".ff.net.2") for n in got) and any(n.endswith(".to_q") for n in got)
    with pytest.raises(ChaintuneError, match=r"no layer of UNet2DConditionModel is named or ends with nope, ff\.x"):
        lora_target_layers(tiny_sd_model().denoiser, "to_q,nope,ff.x")
    with pytest.raises(ChaintuneError, match="has no feed-forward layers"):  # UNet2DModel: attention, no FeedForward
        lora_target_layers(tiny_unet_model().denoiser, "attention+ff")


def test_feed_forward_lora_run_saves_its_targets_and_loads_in_chaintune_and_diffusers(tmp_path):
    base = tiny_sd_model()
    base.save(tmp_path / "base")
    images = torch.rand(6, *base.pixel_shape, generator=torch.Generator().manual_seed(0))
    cfg = TransferConfig.from_dict(dict(method="plain", steps=3, batch_size=5, peft="lora", lr=1e-2, lora_rank=2,
                                        lora_targets="attention+ff", eval_data=None, grid_samples=2, sample_steps=2))
    run = tmp_path / "run"
    res = transfer(cfg, model=chaintune.load(str(tmp_path / "base")), target=(images, torch.zeros(6, dtype=torch.long)),
                   show_progress=False, out=run)
    assert all(math.isfinite(r["loss"]) for r in res.history)
    assert any(".ff.net.2.lora_B" in n for n in res.trainable)
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert any(n.endswith(".ff.net.2") for n in saved) and any(n.endswith(".to_q") for n in saved)

    merged = chaintune.load(run)  # model/: LoRA folded into the weights
    shutil.rmtree(run / "model")  # as a model too large to merge is saved: adapter/ over the base model
    tuned = chaintune.load(run)
    assert _adapted(tuned.denoiser) == set(saved)  # LoRA exactly where the run trained it
    ff_b = [p for n, p in tuned.denoiser.named_parameters() if ".ff.net.2.lora_B" in n]
    assert ff_b and any(p.abs().max() > 0 for p in ff_b)  # the feed-forward LoRA trained and was loaded
    plain = tiny_sd_model()
    plain.pipe.load_lora_weights(str(run / "adapter"))  # diffusers' format: the ff layers come along
    x, t = torch.randn(2, *base.latent_shape), torch.tensor([300, 700])
    c = base.null_conditions(2)
    with torch.no_grad():
        torch.testing.assert_close(plain.model_output(x, t, c), tuned.model_output(x, t, c), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged.model_output(x, t, c), tuned.model_output(x, t, c), rtol=1e-4, atol=1e-5)
        attention_only = tiny_sd_model()  # the same weights without the feed-forward LoRA differ: ff mattered
        sd = {k: v for k, v in tuned.denoiser.state_dict().items() if ".ff." not in k or "lora_" not in k}
        apply_lora(attention_only.denoiser, rank=2)
        attention_only.denoiser.load_state_dict({k: v for k, v in sd.items() if "lora_" in k}, strict=False)
        assert not torch.allclose(attention_only.model_output(x, t, c), tuned.model_output(x, t, c), atol=1e-5)


def test_cli_refuses_unknown_targets_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["align", "--model", "builtin:digits", "--peft", "lora", "--lora-targets", "to_q,nope", "--steps", "1",
              "--out", str(out), "--no-progress", "--no-tensorboard"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: lora_targets: no layer of") and "nope" in err[-1]
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["align", "--lora-targets", "to_q;x", "--out", str(out)])
    assert e.value.code == 2 and "lora_targets must be" in capsys.readouterr().err


def test_wan_feed_forward_adapter_loads_with_wan_pipelines_own_loader(tmp_path):
    """Flow-GRPO's Wan recipes adapt the feed-forward layers: the saved adapter puts them back in diffusers."""
    model = tiny_wan_model()
    apply_lora(model.denoiser, rank=2, targets="attention+ff")
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    save_tuned_model(tmp_path / "run", model, "lora", 2)
    plain = tiny_wan_model()
    plain.pipe.load_lora_weights(str(tmp_path / "run" / "adapter"))
    assert any(".ffn.net.2" in n and "lora" in n for n, _ in plain.denoiser.named_parameters())
    x, t, c = torch.randn(2, *model.latent_shape), torch.tensor([300.0, 700.0]), model.null_conditions(2)
    with torch.no_grad():
        torch.testing.assert_close(plain.model_output(x, t, c), model.model_output(x, t, c), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(tiny_wan_model().model_output(x, t, c), model.model_output(x, t, c), atol=1e-4)
