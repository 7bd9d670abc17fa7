"""benchmarks/video.py's CI smoke run (``--quick``) on a tiny pixel-space Wan text-to-video model built here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _tiny_video_model(path: Path) -> Path:
    from chaintune.backends.wan import WanModel
    from chaintune.pretrain import build_wan_video
    from chaintune.pretrain.config import ArchConfig

    torch.manual_seed(0)
    arch = ArchConfig(denoiser="wan", num_layers=1, num_attention_heads=2, attention_head_dim=12, ffn_dim=16,
                      patch_size=4, resolution=16, frames=4)
    model = WanModel(build_wan_video(arch, seed=0), max_sequence_length=24, num_frames=4, height=16, width=16,
                     default_prompts="builtin:moving-digits")
    model.save(path)
    return path


def test_video_bench_quick(tmp_path):
    model = _tiny_video_model(tmp_path / "m")
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import video
    finally:
        sys.path.remove(str(ROOT))
    out = tmp_path / "out"
    result = video.main(["--quick", "--model", str(model), "--out", str(out)])
    data = json.loads((out / "video.json").read_text())
    assert (out / "video.png").stat().st_size > 1000
    assert data["memory"]["rows"] == result["memory"]["rows"]

    # memory: every quick method (and the no-grad sampling reference) at every T, measured with finite numbers
    rows = data["memory"]["rows"]
    methods = ["no-grad sampling", "rlr h=2", "full-backprop"]
    assert {(r["method"], r["T"], r["frames"]) for r in rows} == {(m, T, 4) for m in methods for T in (3, 5)}
    for r in rows:
        assert not r.get("skipped"), r
        assert math.isfinite(r["peak_mib"]) and math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        if r["method"] != "no-grad sampling":
            assert math.isfinite(r["time_ratio"]) and math.isfinite(r["grad_norm"]), r
    assert data["memory"]["models"]["lora"]["trainable_parameters"] > 0
    assert {"rlr h=2", "full-backprop"} <= set(data["memory"]["growth"]["lora"]["4"])

    # align: one run per quick method, each with a curve of >= 2 evaluations carrying the reward and the judge
    runs = {r["method"]: r for r in data["align"]["runs"]}
    assert set(runs) == {"rlr", "full-backprop"}, data["align"]["runs"]
    for run in runs.values():
        evals = run["evals"]
        assert len(evals) >= 2, run
        assert [e["samples"] for e in evals] == sorted(e["samples"] for e in evals) and evals[-1]["samples"] == 8
        for e in evals:
            for k in ("eval/reward", "eval/heldout_reward", "eval/identity", "eval/direction", "eval/follows_prompt",
                      "eval/nn_distance", "seconds", "train_seconds"):
                assert math.isfinite(e[k]), (k, e)
        assert evals[-1]["train_seconds"] > 0
