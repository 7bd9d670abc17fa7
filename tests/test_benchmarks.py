"""Smoke tests of the benchmarks: each script's ``--quick`` run in a subprocess.

Each run writes NAME.json and NAME.png into a temporary folder; the JSON must carry the keys the
README tables are built from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, tmp_path: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--out", str(tmp_path),
                           *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_estimators_quick(tmp_path):
    res = _run("estimators", tmp_path)
    assert {"config", "machine", "bias", "sweep", "seconds"} <= set(res)
    rows = {r["estimator"]: r for r in res["bias"]}
    assert {"full-backprop", "truncated k=1", "rlr h=2", "half-order h=1", "half-order h=2", "reinforce",
            "zeroth-order"} <= set(rows)
    for r in rows.values():
        assert {"cosine", "norm_distance", "noise_floor", "mean_z2", "max_abs_z", "proj_ci95", "total_var",
                "total_var_ci95", "sec_per_estimate", "unbiased", "proj_z"} <= set(r)
    assert all({"d", "full-backprop", "half-order h=2", "zeroth-order", "zo_over_ho"} <= set(s) for s in res["sweep"])


def test_alignment_quick(tmp_path):
    res = _run("alignment", tmp_path)
    assert {"config", "machine", "runs", "reach", "seconds"} <= set(res)
    assert len(res["runs"]) == 3
    for run in res["runs"]:
        assert {"method", "evals", "sec_per_step", "sample_sec_same_batch", "peak_mib"} <= set(run)
        last = run["evals"][-1]
        assert {"eval/reward", "eval/heldout_reward", "eval/class_share", "eval/diversity", "samples"} <= set(last)
    assert {"levels", "samples", "base_reward"} <= set(res["reach"])


def test_ranking_quick_with_given_lrs_and_black_box_reward(tmp_path):
    """--ranking: a method with a given LR skips the selection stage; the kept (best held-out) evaluation is
    reported beside the final one; the black-box reward runs with the likelihood-ratio estimators."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "alignment.py"), "--ranking", "--quick",
                           "--out", str(tmp_path), "--reward", "digit-blackbox:5", "--name", "bb",
                           "--chosen-lrs", '{"ddpo (reinforce)": 3e-4}'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "bb.json").read_text())
    assert (tmp_path / "bb.png").stat().st_size > 1000
    assert res["chosen_lr"] == {"ddpo (reinforce)": 3e-4, "rlr h=1": 1e-4}
    assert [r["method"] for r in res["stage1"]] == ["rlr h=1"]  # ddpo's LR was given
    assert not res["failed"]
    for row in res["table"]:
        assert {"share", "delivered_share", "delivered_nn_ratio", "per_seed_share", "reward_at_t"} <= set(row)
    # --reuse: an interrupted ranking's finished runs are taken, not run again, and give the same table
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "alignment.py"), "--ranking", "--quick",
                           "--out", str(tmp_path), "--reward", "digit-blackbox:5", "--name", "again",
                           "--chosen-lrs", '{"ddpo (reinforce)": 3e-4, "rlr h=1": 1e-4}', "--reuse",
                           str(tmp_path / "bb.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reused 2 finished runs, 0 to run" in proc.stdout
    assert json.loads((tmp_path / "again.json").read_text())["table"] == res["table"]


def test_guard_quick(tmp_path):
    """The guard replayed on stored guard-off curves: more patience, fewer false alarms, never fewer catches."""
    res = _run("guard", tmp_path)
    rows = {r["patience"]: r for r in res["table"]}
    assert set(rows) == {1, 2, 3}
    assert rows[1]["false_alarms"] >= rows[2]["false_alarms"] >= rows[3]["false_alarms"]
    assert rows[1]["caught"] >= rows[2]["caught"] >= rows[3]["caught"]
    assert rows[2]["missed"] == 0  # the default patience still catches every run that ends hacked


def test_memory_quick(tmp_path):
    res = _run("memory", tmp_path)
    assert {"config", "machine", "rows", "growth_mib_per_step"} <= set(res)
    assert {r["T"] for r in res["rows"]} == {5, 10}
    assert all("peak_mib" in r and "error" not in r for r in res["rows"]), res["rows"]
    assert {"full-backprop", "rlr h=2"} <= set(res["growth_mib_per_step"])


def test_sampler_quick(tmp_path):
    res = _run("sampler", tmp_path)
    rows = {r["eta"]: r for r in res["rows"]}
    assert set(rows) == {0.0, 1.0}
    assert {"chaintune_s", "diffusers_s", "ratio", "max_abs_diff", "agree"} <= set(rows[0.0])
    assert rows[0.0]["agree"]


@pytest.mark.slow  # ~40 s: it builds a pipeline and runs two fresh processes
def test_peers_quick_runs_chaintunes_side_and_the_floor_without_the_peer(tmp_path):
    res = _run("peers", tmp_path)
    ops = {t["op"]: t for t in res["table"]}
    assert set(ops) == {"sample", "floor"} and res["settings"]["peer"] is None
    assert ops["sample"]["chaintune"]["wall"][0] > 0 and ops["sample"]["over_floor_median"] > 0


def test_transfer_quick(tmp_path):
    res = _run("transfer", tmp_path, "--variant", "psi-only:lam=0,bank-share=0.25")
    assert {"config", "references", "runs", "summary", "forgetting"} <= set(res)
    assert [s["method"] for s in res["summary"]] == ["plain", "diff-tuning", "psi-only"]
    assert res["runs"][-1]["overrides"] == {"method": "diff-tuning", "lam": 0, "bank_share": 0.25}
    assert all(r["fid"] > 0 and r["fid_curve"] for r in res["runs"])
    fg = res["forgetting"]
    assert len(fg["handover"]) == 3 and len(fg["forgetting"]) == len(fg["timesteps"])


def test_transfer_quick_conditional_classes(tmp_path):
    """The class-conditional `classes` setting: a base pretrained on the spot, a bank of chosen classes."""
    res = _run("transfer", tmp_path, "--benchmark", "classes", "--name", "transfer", "--num-classes", "10",
               "--resolution", "8", "--bank-labels", "0,1,2,3,4", "--first-seed", "2", "--skip-forgetting",
               "--methods", "diff-tuning")
    assert res["base"]["num_classes"] == 10 and res["base"]["size"] == 8
    assert res["bank"]["labels"] == [0, 1, 2, 3, 4] and res["bank"]["size"] == 200
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [("diff-tuning", 2)]
    assert res["forgetting"] == {} and res["runs"][0]["fid"] > 0
    rep = res["runs"][0]["samples"]  # what the final samples are (digit classifier, nearest shots)
    assert sum(rep["hist"]) == pytest.approx(1, abs=1e-3) and 0 <= rep["label_match"] <= 1
    assert rep["source_share"] == pytest.approx(sum(rep["hist"][:5]), abs=1e-3)
    assert 0 <= rep["copies"] <= 1 and rep["nn_train"] > 0 and rep["nn_heldout"] > 0


def test_nearest_distance():
    bench = _load_transfer_bench()
    refs = torch.zeros(3, 1, 2, 2)
    refs[1] += 1.0
    imgs = torch.stack([torch.full((1, 2, 2), 0.25), torch.full((1, 2, 2), 0.9)])
    assert bench.nearest_distance(imgs, refs).tolist() == pytest.approx([0.25, 0.1])


def _load_transfer_bench():
    spec = importlib.util.spec_from_file_location("transfer_bench", ROOT / "benchmarks" / "transfer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _result(seeds: list[int], plain: list[float], dt: list[float], **config) -> dict:
    cfg = {"benchmark": "classes", "base": "pretrain:digits-0to4:train", "target": "digits-fewshot-5to9:{k}",
           "eval_data": "digits-5to9:test", "steps": 100, "lr": 1e-4, "bank_size": 10, **config}

    def run(method: str, seed: int, fid: float) -> dict:
        return {"method": method, "peft": "none", "shots": 10, "seed": seed, "steps": 100, "fid": fid,
                "kid": fid / 100, "fid_curve": {"50": fid + 1, "100": fid}}

    runs = [r for s, p, d in zip(seeds, plain, dt, strict=True) for r in (run("plain", s, p), run("diff-tuning", s, d))]
    return {"config": cfg, "references": {"base": {"fid": 40.0}}, "runs": runs, "forgetting": {}, "seconds": 1.0}


def test_transfer_merge_pools_seeds_and_pairs_them(tmp_path, capsys):
    from scipy import stats

    bench = _load_transfer_bench()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result([0, 1], [3.0, 3.2], [2.9, 3.0])))
    b.write_text(json.dumps(_result([2, 3], [3.1, 2.8], [2.8, 2.6])))
    res = bench.main(["--merge", str(a), str(b), "--name", "m", "--out", str(tmp_path)])
    assert (tmp_path / "m.png").stat().st_size > 1000 and json.loads((tmp_path / "m.json").read_text())["paired"]
    summary = {s["method"]: s for s in res["summary"]}
    assert summary["plain"]["n"] == 4 and summary["diff-tuning"]["fid_mean"] == pytest.approx(2.825)
    assert list(summary["plain"]["fid_curve_mean"]) == [50, 100]  # steps in order, not as strings
    (pair,) = res["paired"]
    assert pair["wins"] == 4 and pair["seeds"] == [0, 1, 2, 3]
    d = [-0.1, -0.2, -0.3, -0.2]  # paired differences: t = mean / (sd / sqrt(n)), 3 degrees of freedom
    t = sum(d) / 4 / (stats.tstd(d) / 2)
    assert pair["fid_diff_mean"] == pytest.approx(-0.2) and pair["p_ttest"] == pytest.approx(2 * stats.t.cdf(t, 3))
    assert pair["p_sign"] == pytest.approx(2 / 16)  # all 4 lower: 2 * 0.5^4
    c = tmp_path / "c.json"
    c.write_text(json.dumps(_result([4], [3.0], [2.9], steps=200)))
    for files, needle in (([a, c], "differs from"), ([a, a], "repeats the run")):
        with pytest.raises(SystemExit, match=needle):
            bench.main(["--merge", *map(str, files), "--name", "x", "--out", str(tmp_path)])
    assert not (tmp_path / "x.json").exists()


def test_controlnet_quick(tmp_path):
    res = _run("controlnet", tmp_path)
    assert {"settings", "metric", "runs", "summary"} <= set(res)
    assert {r["method"] for r in res["runs"]} == {"diff-tuning", "plain"}
    assert all(len(r["condition_iou"]) == len(r["steps"]) for r in res["runs"])


@pytest.mark.slow  # ~60 s: two supervised ControlNets, 4 fine-tunings, 6 judgements, 4 memory probes
def test_controlnet_reward_quick(tmp_path):
    res = _run("controlnet_reward", tmp_path)
    assert set(res["chosen_lr"]) == {"rlr", "refl", "full-backprop", "ddpo"}
    assert {"supervised (start)", "rlr", "refl", "full-backprop", "ddpo"} <= set(res["summary"])
    assert all("condition_iou" in res["summary"][m]["eta0"] for m in res["summary"])
    assert {r["method"] for r in res["memory"] if "peak_mib" in r} == {"rlr", "refl", "full-backprop", "ddpo"}


def test_chain_diagnostics_quick(tmp_path):
    res = _run("chain_diagnostics", tmp_path)
    assert {r["target"] for r in res["decided"]} == {"image", "video"}
    for d in res["decided"]:
        assert {"total_effect", "late_share", "where", "span_range", "initial"} <= set(d)
    assert [v["target"] for v in res["variance"]] == ["video"]  # only the prompt model has prompts to split by
    estimators = {r["estimator"] for r in res["terms"] if r["target"] == "video"}
    assert {"full backprop (reference)", "FO term (step 1)", "span term, 1 span [prompt]", "ZO terms [batch]",
            "ddpo, 1st epoch [prompt]"} <= estimators
    assert all({"snr", "cos_mean", "cos_single", "norm"} <= set(r) for r in res["terms"])


def test_which_estimator_quick_reuses_finished_runs(tmp_path):
    """Stage 1 picks an LR on the selection seed, stage 2 runs the reported seeds; a second call with --reuse runs
    nothing again and gives the same table."""
    partial = tmp_path / "runs.json"
    res = _run("which_estimator", tmp_path, "--domain", "video", "--workers", "1", "--partial", str(partial),
               "--name", "which_estimator")
    assert {r["stage"] for r in res["runs"]} == {"select", "report"}
    assert {r["seed"] for r in res["runs"] if r["stage"] == "select"} == {3}
    assert [r["method"] for r in res["table"]] and all(r["seeds"] == 1 for r in res["table"])
    again = _run("which_estimator", tmp_path, "--domain", "video", "--workers", "1", "--reuse", str(partial),
                 "--name", "which_estimator")
    assert again["table"] == res["table"]


@pytest.mark.slow  # ~30 s of subprocesses; what it measures is tested in CI by tests/test_compile.py
def test_compile_quick(tmp_path):
    """The compile benchmark's smoke run: eager and aot_eager time the same step and agree on the gradient."""
    res = _run("compile", tmp_path)
    rows = {r["mode"]: r for r in res["rows"]}
    assert set(rows) == {"eager", "aot_eager"}
    assert rows["aot_eager"]["gradients"] == "agree" and rows["eager"]["step_vs_eager"] == 1.0
    assert all(r["step_median_ms"] > 0 and r["first_call_s"] > 0 for r in rows.values())


def test_throughput_quick(tmp_path):
    """The throughput benchmark's smoke run: a counted, timed RLR step and a matmul peak it cannot exceed by far."""
    res = _run("throughput", tmp_path)
    assert res["step_gflop"] > 0 and res["peak_gflops"] > 0
    assert 0 < res["fraction_of_peak"] < 1.5  # a step of small convolutions does not beat the best matmul


def test_budgets_merged_ranking_deduplicates_shared_runs_and_refuses_other_domains(tmp_path):
    """``budgets.py --ranking A --ranking B``: a ranking that reused another's runs holds copies of them; merged,
    each run counts once (3 seeds, not 6) and every ranking's chosen LRs are kept."""
    from benchmarks.budgets import merged_ranking

    def run(method, seed, stage="report"):
        return {"method": method, "lr": 1e-4, "seed": seed, "stage": stage, "steps": 50, "evals": [{"x": seed}]}

    dom = {"name": "video", "steps": 50}
    a = {"domain": dom, "runs": [run("ddpo", s) for s in range(3)], "chosen_lr": {"ddpo": 1e-4}}
    b = {"domain": dom, "runs": [run("ddpo", s) for s in range(3)] + [run("rlr h=5", s) for s in (0, 1, 2, 3)],
         "chosen_lr": {"rlr h=5": 3e-4}}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for p, d in zip(paths, (a, b), strict=True):
        p.write_text(json.dumps(d))
    merged = merged_ranking(paths)
    assert sorted((r["method"], r["seed"]) for r in merged["runs"]) == sorted(
        [("ddpo", s) for s in range(3)] + [("rlr h=5", s) for s in range(4)])
    assert merged["chosen_lr"] == {"ddpo": 1e-4, "rlr h=5": 3e-4}
    (tmp_path / "c.json").write_text(json.dumps(dict(a, domain={"name": "image", "steps": 150})))
    with pytest.raises(SystemExit, match="different domains"):
        merged_ranking([paths[0], tmp_path / "c.json"])
