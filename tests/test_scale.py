"""benchmarks/scale.py's CI smoke run, and ``chaintune plan`` on saved tiny SDXL, FLUX and Wan pipelines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_scale_quick_writes_json(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import scale
    finally:
        sys.path.remove(str(ROOT))
    result = scale.main(["--quick", "--families", "sd15", "--steps", "3", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "scale.json").read_text())
    assert (tmp_path / "scale.png").exists()
    assert {"config", "method", "machine", "models", "rows", "seconds"} <= set(data)
    assert data["models"]["sd15/lora"]["trainable_parameters"] > 0
    rows = [r for r in data["rows"] if r["method"] != "no-grad sampling"]
    assert {r["method"] for r in rows} == set(scale.METHODS)
    assert {r["T"] for r in rows} == {3}
    for r in rows:  # every configuration measured (tiny: nothing may time out) with memory, time and ratio
        assert {"family", "peft", "T", "estimator", "checkpoint", "peak_mib", "seconds", "time_ratio"} <= set(r), r
    assert result["rows"] == data["rows"]


@pytest.mark.parametrize("factory", ["tiny_sdxl_model", "tiny_flux_model", "tiny_wan_model"])
def test_plan_on_saved_tiny_models(factory, tmp_path, capsys):
    from chaintune import testing
    from chaintune.cli.main import main

    getattr(testing, factory)().save(tmp_path / "model")
    capsys.readouterr()
    main(["plan", "--model", str(tmp_path / "model"), "--memory-budget", "2GB", "--sample-steps", "10"])
    out = capsys.readouterr().out
    assert "h*" in out and "gradient ckpt" in out and "max batch at h=2" in out
    h = int(next(ln for ln in out.splitlines() if ln.startswith("h*")).split()[1])
    assert 1 <= h <= 9


def test_measure_peak_sees_an_allocation_and_a_timeout():
    import torch

    from chaintune.plan.memory import measure_peak

    res = measure_peak(lambda: {"s": float(torch.ones(64, 2**18).sum())})  # 64 MiB of float32
    assert res["peak_bytes"] >= 60 * 2**20 and res["s"] > 0
    res = measure_peak(lambda: __import__("time").sleep(5), timeout=0.5)
    assert res.get("timed_out") and "timed out" in res["error"]
