"""The run report: self-contained HTML with curves, sample grids, metric table and config."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch

from chaintune.cli.main import main
from chaintune.errors import ChaintuneError
from chaintune.run.report import build_report, metric_series, read_metrics, sample_grids
from chaintune.utils.images import save_grid


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "digit3"
    run.mkdir(parents=True)
    info = {"command": "align", "base_model": "builtin:digits", "peft": "lora", "status": "finished",
            "config": {"reward": "digit:3", "estimator": {"name": "rlr", "h": 2}, "lr": 1e-4, "steps": 100}}
    (run / "chaintune_run.json").write_text(json.dumps(info))
    lines = [{"step": s, "loss": 1.0 / (s + 1), "reward_mean": -2.0 + s / 50} for s in range(0, 101, 10)]
    lines[0].update({"eval/reward": -2.1, "eval/heldout_reward": -2.3, "eval/diversity": 0.8, "fid": 40.0})
    lines[-1].update({"eval/reward": -0.4, "eval/heldout_reward": -0.9, "eval/diversity": 0.6, "fid": 25.0,
                      "note": "text is not plotted"})
    lines[5]["loss"] = float("nan")
    text = "\n".join(json.dumps(rec) for rec in lines) + '\n{"step": 110, "loss": 0.'  # a crash mid-write
    (run / "metrics.jsonl").write_text(text)
    g = torch.Generator().manual_seed(0)
    save_grid(torch.rand(4, 1, 8, 8, generator=g), run / "samples" / "step_100.png")
    save_grid(torch.rand(4, 1, 8, 8, generator=g), run / "samples" / "step_20.png")
    return run


def test_report_is_self_contained_with_curves_grids_and_table(run_dir):
    out = build_report(run_dir)
    assert out == run_dir / "report.html"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # one chart per numeric key, embedded as PNG; text values are not plotted
    for key in ("loss", "reward_mean", "eval/reward", "eval/heldout_reward", "eval/diversity", "fid"):
        assert re.search(rf"<img alt='{re.escape(key)}' src='data:image/png;base64,", page), key
    assert "alt='note'" not in page
    # both grids inline, ordered by step number (20 before 100, not by name)
    uris = [base64.b64encode((run_dir / "samples" / n).read_bytes()).decode() for n in ("step_20.png", "step_100.png")]
    assert all(u in page for u in uris)
    assert page.index(uris[0]) < page.index(uris[1])
    assert "step 20" in page and "step 100" in page
    # metric table: first, delivered (here the last step's model) and last value of each key
    assert "first vs delivered" in page and ">40<" in page and ">25<" in page
    assert "the delivered model (model/) is that of the last step" in page
    assert "1 unreadable line(s)" in page
    # config table and the whole run JSON
    assert "estimator.h" in page and "digit:3" in page and "builtin:digits" in page
    # nothing fetched from outside: opens offline
    assert not re.search(r"https?://", page)
    assert "<script" not in page and "<link" not in page


def test_report_helpers(run_dir):
    records, bad = read_metrics(run_dir / "metrics.jsonl")
    assert len(records) == 11 and bad == 1
    series = metric_series(records)
    assert series["fid"] == [(0.0, 40.0), (100.0, 25.0)]
    assert "note" not in series and "step" not in series
    assert [p.name for p in sample_grids(run_dir)] == ["step_20.png", "step_100.png"]


def test_report_without_metrics_or_samples(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "chaintune_run.json").write_text(json.dumps({"command": "transfer", "config": {}}))
    page = build_report(run).read_text(encoding="utf-8")
    assert "No metrics.jsonl" in page and "No sample grids" in page


def test_report_errors_for_missing_or_corrupt_runs(tmp_path):
    with pytest.raises(ChaintuneError, match="does not exist"):
        build_report(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "chaintune_run.json").write_text("{not json")
    with pytest.raises(ChaintuneError, match="missing or corrupt"):
        build_report(bad)
    assert not (bad / "report.html").exists()


def test_cli_report(run_dir, tmp_path, capsys):
    main(["report", str(run_dir)])
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    assert (run_dir / "report.html").exists()
    for target in (tmp_path / "missing", tmp_path):  # no such dir; a dir that is not a run
        with pytest.raises(SystemExit) as exc:
            main(["report", str(target)])
        assert exc.value.code != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err


def test_metric_directions_colour_hacking_red():
    """A rising nn-distance (hacking) is bad, a rising share good; spreads and bookkeeping are neither."""
    from chaintune.run.report import metric_direction

    assert metric_direction("eval/nn_distance") == -1 and metric_direction("eval/fid") == -1
    assert metric_direction("eval/class_share") == 1 and metric_direction("eval/heldout_reward") == 1
    assert metric_direction("eval/heldout_reward_se") == 0 and metric_direction("reward_std") == 0
    assert metric_direction("lr") == 0 and metric_direction("grad_norm") == 0


def test_report_compares_with_the_delivered_model_and_leaves_noise_uncoloured(run_dir):
    """model/ holds the kept best evaluation (step 0 here): the table's delivered column and change are its, said in
    plain words; a change within the evaluation's noise (2e-5 of an nn-distance of 0.12) is not coloured."""
    info = json.loads((run_dir / "chaintune_run.json").read_text())
    info.update(final_model="best (step 0)", config={**info["config"], "eval_samples": 64})
    (run_dir / "chaintune_run.json").write_text(json.dumps(info))
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()[:-1]]
    recs[0].update({"eval/nn_distance": 0.12, "eval/class_share": 0.5})
    recs[-1].update({"eval/nn_distance": 0.12002, "eval/class_share": 0.53})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    page = build_report(run_dir).read_text(encoding="utf-8")
    assert "is the best evaluation, step 0, not the last" in page
    row = re.search(r"<th>fid</th>(.*?)</tr>", page).group(1)
    cells = re.findall(r"<td class='num ?([a-z]*)'>([^<]*)</td>", row)
    assert [v for _, v in cells[:5]] == ["40", "0", "40", "0", "0"]  # first, at, delivered, at, change
    for key in ("eval/nn_distance", "eval/class_share"):  # 2e-5 of 0.12; 3 points of a 64-sample share
        row = re.search(rf"<th>{re.escape(key)}</th>(.*?)</tr>", page).group(1)
        assert "good" not in row and "bad" not in row, key


def test_change_noise():
    from chaintune.run.report import change_noise

    assert change_noise("eval/heldout_reward", -2.0, -1.0, (0.3, 0.4)) == pytest.approx(1.0)
    assert change_noise("eval/class_share", 0.5, 0.5, n=64) == pytest.approx(2 * (0.5 / 64) ** 0.5)
    assert change_noise("eval/nn_distance", 0.12, 0.13) == pytest.approx(0.0013)
