"""The alignment trainer end to end on builtin:digits at toy size: outputs, LoRA, guards, config, planner."""

from __future__ import annotations

import json

import pytest
import torch

import chaintune
from chaintune.align import AlignConfig, align, read_metrics

# final_model="last": these tests check what training wrote; the default keeps the best held-out evaluation,
# which after 3 toy steps may be the base model itself (tests/test_hacking.py covers that)
TINY = dict(model="builtin:digits", reward="digit:3", steps=3, batch_size=4, sample_steps=4, eval_every=3,
            eval_samples=8, tensorboard=False, progress=False, final_model="last")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    align(AlignConfig.from_dict(dict(**TINY, estimator="rlr", zo=True, out=str(out))))
    return out


def test_run_directory_is_complete_and_loads_in_diffusers(full_run):
    from diffusers import DDPMPipeline

    info = json.loads((full_run / "chaintune_run.json").read_text())
    assert info["status"] == "finished" and info["config"]["estimator"] == "rlr"
    rows = read_metrics(full_run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ("eval/reward", "eval/heldout_reward", "eval/class_share", "eval/diversity", "eval/nn_distance"):
        assert key in rows[0] and key in rows[-1]
    assert {"reward_mean", "grad_norm", "zo_steps"} <= set(rows[1])
    assert sorted(p.name for p in (full_run / "samples").glob("*.png")) == ["step_000000.png", "step_000003.png"]
    assert (full_run / "config.yaml").exists() and list((full_run / "checkpoints").glob("step_*"))
    pipe = DDPMPipeline.from_pretrained(full_run / "model")
    tuned = chaintune.load(full_run)
    base = chaintune.load("builtin:digits")
    w = "conv_out.weight"
    torch.testing.assert_close(pipe.unet.state_dict()[w], tuned.denoiser.state_dict()[w])
    assert not torch.equal(base.denoiser.state_dict()[w], tuned.denoiser.state_dict()[w])  # training moved it


def test_lora_run_writes_adapter_and_merged_model(tmp_path):
    out = tmp_path / "lora"
    align(AlignConfig.from_dict(dict(**TINY, estimator="truncated-backprop", peft="lora", lora_rank=2, lr=1e-2,
                                     out=str(out))))
    info = json.loads((out / "chaintune_run.json").read_text())
    assert info["peft"] == "lora" and 0 < info["trainable_parameters"] < 20_000
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged = chaintune.load(out)  # model/ (LoRA merged into the weights)
    import shutil

    shutil.rmtree(out / "model")
    adapted = chaintune.load(out)  # base model + adapter/
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 20])
    with torch.no_grad():
        a = merged.denoiser(x, t).sample
        b = adapted.denoiser(x, t).sample
        c = chaintune.load("builtin:digits").denoiser(x, t).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c)


def test_guards_are_trained_and_logged(tmp_path):
    out = tmp_path / "guards"
    align(AlignConfig.from_dict(dict(**TINY, estimator="rlr", kl_weight=0.1, retention_weight=0.5,
                                     retention_samples=8, out=str(out))))
    rows = read_metrics(out)
    assert all("kl" in r and "retention_loss" in r for r in rows[1:])
    assert all(r["kl"] >= 0 for r in rows[1:])


def test_rlr_on_a_black_box_reward_says_what_it_falls_back_to(tmp_path, capsys):
    """A black-box reward takes away RLR's pathwise last step: the run says so and names the measured
    alternative; a differentiable reward gets no such note."""
    tiny = dict(TINY, steps=1, eval_every=0, report=False, kl_weight=0.0)
    align(AlignConfig.from_dict(dict(tiny, reward="digit-blackbox:3", out=str(tmp_path / "bb"))))
    assert "is black-box, so RLR's first-order last step becomes a zeroth-order one" in capsys.readouterr().err
    align(AlignConfig.from_dict(dict(tiny, reward="digit:3", out=str(tmp_path / "fo"))))
    assert "black-box" not in capsys.readouterr().err


def test_kl_is_zero_before_any_update():
    from chaintune.adapters import apply_lora
    from chaintune.align import kl_to_base
    from chaintune.sampling import chain_scheduler

    model = chaintune.load("builtin:digits")
    apply_lora(model.denoiser, rank=2)
    cfg = AlignConfig.from_dict(TINY)
    kl = kl_to_base(model, None, cfg.chain, chain_scheduler(model, "ddim"), torch.Generator().manual_seed(0),
                    model.default_conditions(4), n=4)
    assert float(kl) == pytest.approx(0.0, abs=1e-10)  # LoRA B starts at zero: tuned == base


def test_config_file_and_flags(tmp_path, monkeypatch):
    from chaintune.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("steps: 1\nbatch_size: 2\nsample_steps: 3\neval_samples: 4\nlr: 0.5\n"
                                     "tensorboard: false\nestimator: truncated-backprop\n")
    main(["align", "--config", "c.yaml", "--lr", "0.001", "--out", "r"])  # returns normally on success
    saved = json.loads((tmp_path / "r" / "chaintune_run.json").read_text())["config"]
    assert saved["lr"] == 0.001 and saved["batch_size"] == 2 and saved["estimator"] == "truncated-backprop"


def test_rlr_and_schedule_options_reach_the_trainer(tmp_path, monkeypatch):
    from chaintune.align import estimator_from_config
    from chaintune.cli.main import main
    from chaintune.errors import ChaintuneError

    est = estimator_from_config(AlignConfig.from_dict(dict(estimator="rlr", h=2, j="10,20", spans=3, zo=True)))
    assert (est.h, est.spans, est.zo) == (2, 3, True)
    with pytest.raises(ChaintuneError, match="spans must be >= 1, got 0"):
        AlignConfig.from_dict({"spans": 0}).validate()
    with pytest.raises(ChaintuneError, match="lr_schedule 'cosin' \\(did you mean 'cosine'"):
        AlignConfig.from_dict({"lr_schedule": "cosin"}).validate()
    monkeypatch.chdir(tmp_path)
    main(["align", "--spans", "2", "--lr-schedule", "cosine", "--steps", "3", "--batch-size", "2",
          "--sample-steps", "3", "--eval-samples", "4", "--eval-every", "3", "--no-tensorboard", "--out", "r"])
    saved = json.loads((tmp_path / "r" / "chaintune_run.json").read_text())["config"]
    assert saved["spans"] == 2 and saved["estimator"] == "rlr" and saved["lr_schedule"] == "cosine"
    metrics = [m for m in read_metrics(tmp_path / "r") if "lr" in m]
    assert all(m.get("spans") == 2 for m in metrics)  # the estimator logs how many spans it averaged
    lrs = [m["lr"] for m in metrics]  # cosine from 3e-4 to 0 over 3 steps, logged after each step
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 3e-4 and lrs[-1] == pytest.approx(0, abs=1e-12)


def test_planner_formula_and_cli(capsys):
    from chaintune.cli.main import main
    from chaintune.plan.memory import h_star

    # paper: h* = floor((B - B_z (T-1)) / (B_h - B_z)), capped by the variance bound
    assert h_star(1000, 110, 10, 50) == (1000 - 10 * 49) // 100
    assert h_star(10_000, 110, 10, 50, v_h=1.0, v_z=2.0) == min((10_000 - 490) // 100, int(50 * 2.0 / 2.0 - 1), 49)
    main(["plan", "--model", "builtin:digits", "--memory-budget", "2GB", "--sample-steps", "20"])
    out = capsys.readouterr().out
    assert "h*" in out and "B_h" in out


def test_demo_runs_and_prints_table(tmp_path, capsys):
    from chaintune.align.demo import run_demo

    rows = run_demo(tmp_path / "demo", steps=3, digit=3, eval_samples=8, batch_size=8)
    out = capsys.readouterr().out
    assert [r["method"] for r in rows] == ["rlr", "rlr+zo", "reinforce"]
    assert "share of 3s" in out and "nn-dist" in out
    for name in ("before.png", "after_rlr.png", "after_rlr+zo.png", "after_reinforce.png"):
        assert (tmp_path / "demo" / name).exists()
    assert rows[0]["samples"] == 3 * 8
    # one story: the "after" grid and row are the model the run delivers (model/, the kept evaluation)
    import json

    for r in rows:
        run = tmp_path / "demo" / r["method"]
        info = json.loads((run / "chaintune_run.json").read_text())
        kept = info["final"].get("best_step", info["final"]["step"])
        assert r["kept_step"] == kept and r["share_after"] == info["final"]["eval/class_share"]
        grid = run / "samples" / f"step_{kept:06d}.png"
        assert (tmp_path / "demo" / f"after_{r['method']}.png").read_bytes() == grid.read_bytes()
    rows2 = run_demo(tmp_path / "demo", steps=3, digit=3, eval_samples=8, batch_size=8, baseline=None)
    assert len(rows2) == 2  # a second demo into the same folder replaces what the first wrote


def test_a_runs_updates_do_not_depend_on_what_loading_or_evaluation_drew(tmp_path, monkeypatch):
    """Found with tests/test_per_sample.py: the first run in a process drew LoRA's initial weights after a first
    load had drawn from the global generator, later runs (cached loads) before: the same config gave different
    runs. The adapters are now seeded where they are made and evaluation runs on a forked generator."""
    from safetensors.torch import load_file

    from chaintune.align import AlignConfig, align
    from chaintune.align.objective import AlignObjective

    base = dict(model="builtin:digits", reward="digit:3", steps=2, batch_size=4, sample_steps=4, eval_every=0,
                tensorboard=False, progress=False, report=False, final_model="last", estimator="reinforce",
                peft="lora", lora_rank=2, kl_weight=0.0)
    align(AlignConfig.from_dict(dict(base, out=str(tmp_path / "a"))))
    prepare, evaluate = AlignObjective.prepare, AlignObjective.evaluate

    def drawing(f):
        def wrapped(self, *a):
            torch.rand(11)  # a loader or a judge that draws random numbers (a first, uncached load)
            return f(self, *a)
        return wrapped

    monkeypatch.setattr(AlignObjective, "prepare", drawing(prepare))
    monkeypatch.setattr(AlignObjective, "evaluate", drawing(evaluate))
    align(AlignConfig.from_dict(dict(base, eval_every=1, out=str(tmp_path / "b"))))
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
