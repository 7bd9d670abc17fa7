"""The run skeleton every trainer shares: one run directory, status words, resume, non-finite policy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from chaintune.errors import ChaintuneError
from chaintune.pretrain import PretrainObjective
from chaintune.pretrain.config import PretrainConfig
from chaintune.run.trainer import Trainer, format_summary

TINY_PRETRAIN = {"dataset": "digits:train", "block_out_channels": [8, 16], "norm_num_groups": 4, "steps": 4,
                 "batch_size": 8, "warmup_steps": 1, "save_every": 2, "eval_every": 2, "eval_samples": 4,
                 "tensorboard": False, "progress": False}


def _pretrain(out, resume=False, **kw):
    cfg = PretrainConfig.from_dict({**TINY_PRETRAIN, **kw})
    return Trainer(cfg, PretrainObjective(cfg), out=out, resume=resume).fit()


def test_pretrain_writes_the_common_run_directory_and_resumes_bit_exactly(tmp_path):
    full = _pretrain(tmp_path / "full")
    info = json.loads((tmp_path / "full" / "chaintune_run.json").read_text())
    assert info["command"] == "pretrain" and info["status"] == "finished"
    assert info["config"]["steps"] == 4 and info["final"]["step"] == 4
    for name in ("config.yaml", "metrics.jsonl", "report.html", "model/model_index.json",
                 "checkpoints/step_000004/trainer.json", "samples/step_000002.png"):
        assert (tmp_path / "full" / name).exists(), name
    import chaintune

    loaded = chaintune.load(tmp_path / "full")
    for (k, a), b in zip(full.model.denoiser.state_dict().items(), loaded.denoiser.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)  # EMA weights are what is saved

    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000002", cut / "checkpoints" / "step_000002")
    shutil.copy(tmp_path / "full" / "config.yaml", cut / "config.yaml")
    shutil.copy(tmp_path / "full" / "chaintune_run.json", cut / "chaintune_run.json")
    resumed = _pretrain(cut, resume=True)
    for (k, a), b in zip(full.model.denoiser.state_dict().items(), resumed.model.denoiser.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    steps = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4 and steps == sorted(set(steps))


def test_non_finite_updates_are_skipped_then_the_run_stops_with_its_status(tmp_path, capsys):
    """An LR that blows the weights up: warnings, then one error after max_bad_steps, status 'failed: ...'."""
    with pytest.raises(ChaintuneError, match="2 non-finite gradients in a row"):
        _pretrain(tmp_path / "bad", lr=1e30, max_grad_norm=0.0, max_bad_steps=2, steps=6, save_every=1,
                  warmup_steps=0, progress=True)
    err = capsys.readouterr().err
    assert "non-finite gradient, update skipped (1/2 in a row)" in err
    info = json.loads((tmp_path / "bad" / "chaintune_run.json").read_text())
    assert info["status"].startswith("failed: ") and "non-finite" in info["status"]
    ckpts = sorted(p.name for p in (tmp_path / "bad" / "checkpoints").iterdir())
    assert ckpts and all(torch.isfinite(t).all() for t in _load_weights(tmp_path / "bad" / "checkpoints" / ckpts[-1]))


def _load_weights(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "trainable.safetensors")).values()


def test_summary_names_the_evaluation_metrics(tmp_path):
    from chaintune.align import align_run
    from chaintune.align.config import AlignConfig

    cfg = AlignConfig.from_dict({"steps": 2, "batch_size": 4, "sample_steps": 4, "eval_every": 2,
                                 "eval_samples": 8, "tensorboard": False, "progress": False,
                                 "out": str(tmp_path / "a")})
    text = format_summary(align_run(cfg))
    assert "class_share" in text and "->" in text and "report.html" in text
    assert json.loads((tmp_path / "a" / "chaintune_run.json").read_text())["status"] == "finished"


def test_existing_run_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("mine")
    import chaintune
    from chaintune.align import align
    from chaintune.align.config import AlignConfig

    monkeypatch.setattr(chaintune, "load", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(ChaintuneError, match="already holds files"):
        align(AlignConfig.from_dict({"out": str(tmp_path / "r")}))
    assert (tmp_path / "r" / "keep.txt").read_text() == "mine"


def test_missing_cuda_is_an_input_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ChaintuneError, match="CUDA is not available"):
        _pretrain(tmp_path / "c", device="cuda")
    assert not (tmp_path / "c").exists()
