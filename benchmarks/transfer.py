"""Offline transfer benchmarks: Diff-Tuning vs plain fine-tuning at equal steps.

A benchmark is a preset, a YAML file under ``benchmarks/presets/`` (``--benchmark NAME``, or the path of
your own file): its data (base model, few-shot target, held-out evaluation images, references) and,
over ``presets/defaults.yaml``, its run settings and those of ``--quick``. Flags override the preset.

* ``glyphs`` (default): ``builtin:glyphs`` (digits typeset from fonts) -> few-shot handwritten
  digits (``digits-fewshot:K``), FID vs the held-out ``digits:test``. Source and target differ
  even in fine detail (typeset vs handwritten strokes).
* ``classes``: a DDPM pretrained on handwritten digits 0-4 (``pretrain:digits-0to4:train``: the shipped
  ``builtin:digits`` recipe, pretrained here once (~13 min) and cached) -> few-shot handwritten digits 5-9
  (``digits-fewshot-5to9:K``), FID vs the held-out ``digits-5to9:test``. Same writers, pen and
  scanner, new global shapes: the setting where Diff-Tuning's premise (low-noise denoising is
  shared across domains) holds by construction.

Both run several seeds (optionally PEFT variants with seed 0), record FID at intermediate steps
(``fid_curve``), report what the final samples are (:func:`chaintune.transfer.diagnostics.sample_report`)
and analyse the chain of forgetting of the plainly fine-tuned model. FID/KID use the shipped digit
classifier's features on 1000 generated images against images never seen in training.

    python benchmarks/transfer.py                        # glyphs: about 30 min on one core
    python benchmarks/transfer.py --benchmark classes --shots 10 --eval-every 250
    python benchmarks/transfer.py --benchmark my_preset.yaml
    python benchmarks/transfer.py --quick                # CI smoke: under 2 min
    python benchmarks/transfer.py --merge a.json b.json --name c   # pool seeds of equal-config runs

Writes ``benchmarks/results/transfer.json`` / ``transfer.png`` (``classes``: ``transfer_classes.*``;
``--quick``: under ``benchmarks/results/tmp/``; ``--name`` overrides the stem) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from chaintune.transfer.diagnostics import model_sample_report, nearest_distance  # noqa: E402,F401

ROOT = Path(__file__).resolve().parent
PRESETS = ROOT / "presets"
BENCHMARKS = sorted(p.stem for p in PRESETS.glob("*.yaml") if p.stem != "defaults")
DATA_KEYS = ("base", "target", "eval_data", "real", "source", "name")  # every preset names these
SECTIONS = ("description", "run", "quick", "pretrain")


def _merged(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section (a preset changes one key, not a whole section)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _defaults() -> dict:
    return yaml.safe_load((PRESETS / "defaults.yaml").read_text())


def load_preset(name: str) -> dict:
    """A benchmark preset: ``presets/NAME.yaml`` (or a YAML path) over ``presets/defaults.yaml``."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: unknown benchmark {name!r}: one of {', '.join(BENCHMARKS)} or a preset .yaml file")
    defaults = _defaults()
    own = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(own) - set(DATA_KEYS) - set(SECTIONS))
    unknown += sorted(f"{sec}.{k}" for sec in ("run", "quick") for k in own.get(sec) or {}
                      if k not in defaults["run"])
    missing = [k for k in DATA_KEYS if k not in own]
    if unknown or missing:
        raise SystemExit(f"error: preset {path}: " + "; ".join(
            ([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
            + ([f"missing {', '.join(missing)}"] if missing else [])))
    return _merged(defaults, own)


def parse_args(argv=None) -> argparse.Namespace:
    run = _defaults()["run"]  # for the help texts; the chosen preset may override them
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run (< 2 min): the presets' quick settings")
    p.add_argument("--seeds", type=int, default=None, help=f"(default: the preset's, {run['seeds']})")
    p.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    p.add_argument("--skip-forgetting", action="store_true", help="no chain-of-forgetting analysis")
    p.add_argument("--steps", type=int, default=None,
                   help=f"fine-tuning steps per run (equal for all methods; default {run['steps']})")
    p.add_argument("--shots", default=None,
                   help=f"images per class in the few-shot target (comma list; default {run['shots']})")
    p.add_argument("--peft", default=None, help="PEFT variants run with seed 0, e.g. difffit,lora (default: none)")
    p.add_argument("--lr", type=float, default=None, help=f"(default {run['lr']})")
    p.add_argument("--bank-size", type=int, default=None, help=f"(default {run['bank_size']})")
    p.add_argument("--eval-samples", type=int, default=None, help=f"(default {run['eval_samples']})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this model size)")
    p.add_argument("--benchmark", default="glyphs", metavar="|".join(BENCHMARKS) + "|FILE.yaml",
                   help="preset of base / target / evaluation data and run settings (module docstring)")
    p.add_argument("--base", default=None, help="pretrained source model: a model id or pretrain:DATASET "
                   "(default: the benchmark's)")
    p.add_argument("--target", default=None, help="few-shot target dataset id with {k} for the shot count")
    p.add_argument("--eval-data", default=None, help="held-out target images for FID")
    p.add_argument("--eval-every", type=int, default=None, help="FID every N steps (default: steps // 2)")
    p.add_argument("--methods", default=None,
                   help=f"transfer methods run for every seed (default {run['methods']})")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="an extra Diff-Tuning variant run like the methods, with TransferConfig overrides, "
                        "e.g. psi-only:lam=0 or retention-only:alpha=0 (repeatable)")
    p.add_argument("--resolution", type=int, default=None,
                   help="pixel size of a pretrain: base (default: the shipped config's 8)")
    p.add_argument("--sample-guidance", type=float, default=None,
                   help="CFG scale of the evaluation samples of a class-conditional model (default: none)")
    p.add_argument("--bank-labels", default=None,
                   help="classes of a conditional base's bank samples: random, null or a list like 0,1,2,3,4")
    p.add_argument("--num-classes", type=int, default=None,
                   help="pretrain: a class-conditional base (bank samples then train its null class)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="pretrain: training steps of the base (default: the shipped config's 4000; --quick: 40)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="pool the runs of result files made with the same settings (other seeds) into one "
                        "table and plot; nothing is trained")
    p.add_argument("--name", default=None, help="stem of the result files (default: the benchmark's)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    preset = load_preset(a.benchmark)
    # layers, last wins: preset run settings, --quick's, the flags given (None: not given)
    settings = _merged(preset["run"], preset["quick"]) if a.quick else preset["run"]
    for key in (*DATA_KEYS, *settings):
        if getattr(a, key, None) is None:
            setattr(a, key, preset[key] if key in DATA_KEYS else settings[key])
    a.eval_every = a.eval_every or a.steps // 2
    a.variants = dict(parse_variant(v) for v in a.variant)
    a.out = a.out or (ROOT / "results" / ("tmp" if a.quick else ""))
    return a


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:KEY=VALUE,...`` -> (NAME, overrides); values are parsed as YAML scalars (numbers, bools).
    ``schedule=forgetting``: alpha, beta and lam are derived per run as ``transfer --pilot`` derives them (a plain
    probe of a fifth of the steps, same seed, then its chain of forgetting on the held-out images)."""
    from chaintune.errors import ChaintuneError
    from chaintune.transfer import TransferConfig

    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not name:
            raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
    if overrides.get("schedule", "forgetting") != "forgetting":
        raise SystemExit(f"--variant {text!r}: schedule takes only 'forgetting'")
    try:  # unknown option names fail here, before anything runs
        TransferConfig.from_dict({"method": "diff-tuning", **{k: v for k, v in overrides.items() if k != "schedule"}})
    except ChaintuneError as e:
        raise SystemExit(f"--variant {text!r}: {e}") from None
    return name, {"method": "diff-tuning", **overrides}


def _flat(cfg) -> dict:
    """A config's options by flat name (the keys ``from_dict`` takes), however its sections nest."""
    from chaintune.options import flat_values

    return flat_values(cfg)


def bank_config(values: dict):
    """The knowledge-bank settings of a transfer run with these flat options."""
    from chaintune.transfer import TransferConfig

    cfg = TransferConfig.from_dict(values)
    cfg.validate()  # bank labels "0,1,2" -> [0, 1, 2]
    return cfg.bank


PRETRAIN_KEY = ("dataset", "resolution", "block_out_channels", "layers_per_block", "attention", "norm_num_groups",
                "num_classes", "num_train_timesteps", "beta_schedule", "prediction_type", "steps", "batch_size", "lr",
                "warmup_steps", "ema_decay", "label_dropout", "seed")


def pretrained_base(spec: str, resolution: int | None = None, num_classes: int | None = None,
                    steps: int | None = None, pretrain_preset: dict | None = None):
    """``(model, id)`` for ``--base``: a model id, or ``pretrain:DATASET`` — the preset's recipe (default the
    shipped ``builtin:digits`` training config, ``chaintune/configs/builtin_digits.yaml``) run on DATASET,
    cached under the preset's cache folder (deterministic: seed 0, about 13 min on one core)."""
    import hashlib
    import json

    import chaintune

    if not spec.startswith("pretrain:"):
        return chaintune.load(spec), spec
    from chaintune.pretrain import PretrainConfig, pretrain

    settings = pretrain_preset or _defaults()["pretrain"]
    cfg_path = Path(chaintune.__file__).resolve().parent / "configs" / settings["recipe"]
    values = {**yaml.safe_load(cfg_path.read_text()), "dataset": spec.split(":", 1)[1]}
    if resolution:
        values["resolution"] = resolution
    if num_classes:
        values["num_classes"] = num_classes
    if steps:
        values["steps"] = steps
        values["warmup_steps"] = min(values["warmup_steps"], steps // 2)
    cfg = PretrainConfig.from_dict(values)
    # the key hashes what determines the weights (the options of the first, flat PretrainConfig), so bases
    # cached before the config became nested are found again
    flat = _flat(cfg)
    key = hashlib.sha256(json.dumps({k: flat[k] for k in PRETRAIN_KEY}, sort_keys=True).encode()).hexdigest()[:10]
    path = ROOT / settings["cache"] / f"{values['dataset'].replace(':', '-')}-{key}"
    if not any((p / "model_index.json").exists() for p in (path, path / "model")):
        print(f"pretraining the source model on {values['dataset']} -> {path}", flush=True)
        pretrain(cfg, out=path, show_progress=False, overwrite=True)
    return chaintune.load(str(path)), str(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)
    from chaintune.data import load_dataset
    from chaintune.metrics import fid_kid
    from chaintune.run.pilot import pilot_steps
    from chaintune.transfer import TransferConfig, transfer
    from chaintune.transfer.bank import build_bank
    from chaintune.transfer.data import generate
    from chaintune.transfer.forgetting import analyze, measure_schedule

    t_start = time.time()
    base, base_id = pretrained_base(args.base, args.resolution, args.num_classes, args.pretrain_steps,
                                    load_preset(args.benchmark)["pretrain"])
    size = base.latent_shape[-1]  # pixel-space bases: data at the model's resolution
    test_x, test_y = load_dataset(args.eval_data, size=size)
    train_x, _ = load_dataset(args.real, size=size)
    bank_root = ROOT / "results" / "tmp" / "banks"
    bank = build_bank(base, bank_config({"bank_size": args.bank_size, "bank_labels": args.bank_labels}), bank_root)
    shots = [int(s) for s in args.shots.split(",") if s]
    peft_variants = [p for p in args.peft.split(",") if p]
    sample_steps, feature = args.sample_steps, args.feature

    def fid_of(model) -> dict:
        imgs = generate(model, args.eval_samples, sample_steps, 1.0, seed=args.base_sample_seed)
        return fid_kid(test_x, imgs, feature)

    base_key = "base model (glyphs), no tuning" if args.base == "builtin:glyphs" else "base model, no tuning"
    refs = {
        base_key: fid_of(base),
        f"{args.real} (real data, reference)": fid_kid(test_x, train_x, feature),
        f"{args.source} (source data)": fid_kid(test_x, load_dataset(args.source, size=size)[0], feature),
    }
    targets = {k: load_dataset(args.target.format(k=k), size=size) for k in shots}  # (images, labels)
    for k in shots:
        refs[f"{args.target.format(k=k)} itself"] = fid_kid(test_x, targets[k][0], feature)

    runs: list[dict] = []
    tuned_models: dict = {}

    def settings(k: int, seed: int, peft: str) -> dict:
        return {
            "model": base_id, "data": args.target.format(k=k), "peft": peft, "steps": args.steps,
            "lr": args.lr if peft == "none" else args.lr * args.peft_lr_scale,
            "bank_size": args.bank_size, "bank_labels": args.bank_labels, "bank_dir": str(bank_root),
            "eval_data": args.eval_data, "feature": feature, "eval_every": args.eval_every,
            "eval_samples": args.eval_samples, "sample_steps": sample_steps, "sample_guidance": args.sample_guidance,
            "seed": seed, "log_every": max(1, args.steps // 10)}

    def derived_schedule(k: int, seed: int, peft: str) -> dict:
        """What `transfer --pilot` derives: a plain probe of a fifth of the steps (its pilot_steps), same seed, and
        its chain of forgetting on the held-out images (the pilot's held-out set is the same test split)."""
        cfg = TransferConfig.from_dict({**settings(k, seed, peft), "method": "plain", "eval_every": 0,
                                        "steps": pilot_steps(args.steps, 0)})
        probe = transfer(cfg, model=copy.deepcopy(base), show_progress=False, eval_images=test_x)
        return measure_schedule(base, probe.model, test_x, test_y, seed=seed, lam=cfg.diff_tuning.lam)

    def run(method: str, k: int, seed: int, peft: str = "none") -> dict:
        overrides = dict(args.variants.get(method, {"method": method}))
        derived = derived_schedule(k, seed, peft) if overrides.pop("schedule", None) else None
        if derived:
            overrides.update(alpha=derived["alpha"], beta=derived["beta"], lam=derived["lam"])
            print(f"  {method}: derived alpha {derived['alpha']:g}, beta {derived['beta']:g}, "
                  f"lambda {derived['lam']:g} (gain centred on t = {derived.get('gain_mean_t', 'n/a')})", flush=True)
        cfg = TransferConfig.from_dict({**settings(k, seed, peft), **overrides})
        t0 = time.time()
        res = transfer(cfg, model=copy.deepcopy(base), show_progress=False, eval_images=test_x)
        seconds = round(time.time() - t0, 1)  # training and its evaluations, not the report below
        curve = {r["step"]: r["fid"] for r in res.history if "fid" in r}
        m = res.final
        o = _flat(cfg)  # the final FID's samples: the trainer's seed + 12345 and evaluation settings
        report = model_sample_report(res.model, targets[k], test_x, n=o["eval_samples"], steps=o["sample_steps"],
                                     eta=o["sample_eta"], seed=o["seed"] + 12345,
                                     guidance_scale=o["sample_guidance"], classifier=args.report_classifier)
        row = {"method": method, "overrides": overrides, "derived": derived, "peft": peft, "shots": k, "seed": seed,
               "steps": args.steps, "fid": m["fid"],
               "kid": m["kid"], "kid_std": m["kid_std"], "fid_curve": curve,
               "samples": report,
               "final_loss": res.history[-2]["loss"] if len(res.history) > 1 else None,
               "seconds": seconds}
        runs.append(row)
        tuned_models[(method, peft, k, seed)] = res.model
        mid = " ".join(f"@{s_}:{f:.3f}" for s_, f in curve.items())
        rep = row["samples"]
        match = f"  label match {rep['label_match']:.3f}" if "label_match" in rep else ""
        print(f"  {method:12s} {peft:8s} shots={k:<3d} seed={seed}  FID {m['fid']:7.3f}  KID {m['kid']:.4f}"
              f"  source {rep['source_share']:.3f}{match}  copies {rep['copies']:.3f}  curve {mid}"
              f"  ({row['seconds']}s)", flush=True)
        return row

    print(f"base FID {refs[base_key]['fid']:.3f}; bank {len(bank)} samples "
          f"({'cached' if not bank.generated else 'generated'})", flush=True)
    methods = [m for m in args.methods.split(",") if m] + list(args.variants)
    for k in shots:
        for seed in range(args.first_seed, args.first_seed + (args.seeds if k == shots[0] else 1)):
            for method in methods:
                run(method, k, seed)
    for peft in peft_variants:
        for method in ("plain", "diff-tuning"):
            run(method, shots[0], 0, peft)

    # chain of forgetting of the plainly fine-tuned model (full fine-tuning if it ran, first shot count, seed 0)
    plain = [key for key in tuned_models if key[0] == "plain"]
    forgetting: dict = {}
    if plain and not args.skip_forgetting:
        tuned = tuned_models[min(plain, key=lambda key: (key[1] != "none", key[2] != shots[0], key[3]))]
        fg = args.forgetting
        forgetting = analyze(base, tuned, test_x, bank.latents, eval_images=test_x,
                             num_timesteps=fg["num_timesteps"], thresholds=list(fg["thresholds"]),
                             handover_n=min(fg["handover_samples"], args.eval_samples), steps=sample_steps,
                             feature=feature, target_labels=test_y)

    summary = summarize(runs)
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "paired": paired(runs),
              "base": {"id": base_id, "num_classes": base.num_classes, "size": size},
              "bank": {"path": str(bank.path), "size": len(bank),
                       "labels": sorted(set(bank.labels.tolist())) if bank.labels is not None else None},
              "references": refs, "runs": runs, "summary": summary, "forgetting": forgetting,
              "seconds": round(time.time() - t_start, 1), "torch_threads": args.threads}
    args.out.mkdir(parents=True, exist_ok=True)
    from chaintune.utils.io import save_json

    save_json(args.out / f"{args.name}.json", result)
    plot(result, args.out / f"{args.name}.png")
    print_table(result)
    return result


# settings that must agree for runs to be pooled by --merge
SAME = ("benchmark", "base", "target", "eval_data", "steps", "lr", "bank_size", "eval_samples", "bank_labels",
        "num_classes", "resolution", "sample_guidance", "pretrain_steps")


def merge(args: argparse.Namespace) -> dict:
    """Pool the runs of several result files (e.g. ``--first-seed`` batches) into one result."""
    import json

    from chaintune.utils.io import save_json

    results = []
    for path in args.merge:
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            sys.exit(f"error: cannot read {path}: {e}")
    first = results[0]
    for path, res in zip(args.merge[1:], results[1:], strict=True):
        diff = [k for k in SAME if res["config"].get(k) != first["config"].get(k)]
        if diff:
            sys.exit(f"error: {path} differs from {args.merge[0]} in {', '.join(diff)}; only runs made with the "
                     "same settings can be pooled")
    runs, seen = [], set()
    for path, res in zip(args.merge, results, strict=True):
        for r in res["runs"]:
            key = (r["method"], r["peft"], r["shots"], r["seed"])
            if key in seen:
                sys.exit(f"error: {path} repeats the run {key} (method, peft, shots, seed)")
            seen.add(key)
            runs.append({**r, "fid_curve": {int(st): v for st, v in r["fid_curve"].items()}})  # JSON keys are str
    result = {**first, "config": {**first["config"], "name": args.name, "merged_from": [str(p) for p in args.merge]},
              "runs": runs, "summary": summarize(runs), "paired": paired(runs),
              "forgetting": {},  # per-run analysis: it stays in the file that made it
              "seconds": round(sum(r.get("seconds", 0) for r in results), 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(args.out / f"{args.name}.json", result)
    plot(result, args.out / f"{args.name}.png")
    print_table(result)
    return result


def paired(runs: list[dict]) -> list[dict]:
    """Each method against plain fine-tuning on the same seeds (same data draw and initial noise).

    Seeds are paired, so the seed-to-seed spread shared by both methods cancels: ``wins`` counts seeds
    where the method's FID is lower, ``p_ttest`` is the two-sided paired t-test of the FID differences
    and ``p_sign`` the two-sided sign test of the wins.
    """
    from scipy import stats

    plain = {(r["peft"], r["shots"], r["seed"]): r for r in runs if r["method"] == "plain"}
    groups: dict = {}
    for r in runs:
        if r["method"] != "plain" and (r["peft"], r["shots"], r["seed"]) in plain:
            groups.setdefault((r["method"], r["peft"], r["shots"]), []).append(r)
    out = []
    for (method, peft, k), rows in groups.items():
        ref = [plain[(peft, k, r["seed"])] for r in rows]
        d_fid = [r["fid"] - p["fid"] for r, p in zip(rows, ref, strict=True)]
        d_kid = [r["kid"] - p["kid"] for r, p in zip(rows, ref, strict=True)]
        wins = sum(d < 0 for d in d_fid)
        row = {"method": method, "peft": peft, "shots": k, "n": len(rows), "seeds": [r["seed"] for r in rows],
               "fid_diff": d_fid, "fid_diff_mean": statistics.mean(d_fid), "wins": wins,
               "kid_diff": d_kid, "kid_diff_mean": statistics.mean(d_kid), "kid_wins": sum(d < 0 for d in d_kid),
               "p_sign": float(stats.binomtest(wins, len(rows)).pvalue)}
        if len(rows) > 1:
            row["fid_diff_std"] = statistics.stdev(d_fid)
            row["p_ttest"] = float(stats.ttest_rel([r["fid"] for r in rows], [p["fid"] for p in ref]).pvalue)
            row["kid_p_ttest"] = float(stats.ttest_rel([r["kid"] for r in rows], [p["kid"] for p in ref]).pvalue)
        out.append(row)
    return out


def summarize(runs: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], r["peft"], r["shots"]), []).append(r)
    out = []
    for (method, peft, k), rows in groups.items():
        fids = [r["fid"] for r in rows]
        steps = sorted(set.intersection(*(set(r["fid_curve"]) for r in rows)))
        curve = {s_: statistics.mean(r["fid_curve"][s_] for r in rows) for s_ in steps}
        curve_std = {s_: statistics.stdev([r["fid_curve"][s_] for r in rows]) if len(rows) > 1 else 0.0
                     for s_ in steps}
        half = rows[0]["steps"] // 2
        out.append({"method": method, "peft": peft, "shots": k, "n": len(rows), "fid_mean": statistics.mean(fids),
                    "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
                    "kid_mean": statistics.mean(r["kid"] for r in rows), "fids": fids,
                    "fid_half_mean": curve.get(half, float("nan")),
                    "fid_curve_mean": curve, "fid_curve_std": curve_std})
    return out


def print_table(result: dict) -> None:
    print(f"\nreferences (FID vs {result['config']['eval_data']}, digits-cnn features)")
    for k, v in result["references"].items():
        print(f"  {k:40s} {v['fid']:8.3f}")
    print(f"\n{'method':12s} {'peft':8s} {'shots':>5s} {'n':>2s} {'FID mean':>9s} {'± std':>7s} {'KID':>8s}  per seed")
    for s in result["summary"]:
        seeds = " ".join(f"{f:.3f}" for f in s["fids"])
        print(f"{s['method']:12s} {s['peft']:8s} {s['shots']:5d} {s['n']:2d} {s['fid_mean']:9.3f} "
              f"{s['fid_std']:7.3f} {s['kid_mean']:8.4f}  {seeds}")
        print("      FID at step: " + "  ".join(f"{st}: {m:.3f}±{s['fid_curve_std'][st]:.3f}"
                                               for st, m in s["fid_curve_mean"].items()))
    if result.get("paired"):
        print("\nagainst plain fine-tuning on the same seeds (FID difference < 0: lower than plain)")
        for r in result["paired"]:
            print(f"  {r['method']:12s} {r['peft']:8s} shots={r['shots']:<3d} FID lower on {r['wins']}/{r['n']} seeds, "
                  f"mean diff {r['fid_diff_mean']:+.3f}, paired t-test p={r.get('p_ttest', float('nan')):.3f}, "
                  f"sign test p={r['p_sign']:.3f}; KID lower on {r['kid_wins']}/{r['n']} "
                  f"(p={r.get('kid_p_ttest', float('nan')):.3f})")
    f = result["forgetting"]
    if not f:
        print(f"\ntotal {result['seconds']:.0f}s")
        return
    print(f"\nchain of forgetting (plain fine-tuning): Spearman(t, relative bank-loss increase) = "
          f"{f.get('forgetting_spearman', float('nan')):.2f}")
    for t, rel in zip(f["timesteps"], f.get("forgetting_relative", []), strict=False):
        print(f"  t={t:4d}  forgetting {rel:+.3f}")
    if "handover" in f:
        print("hand-over FID (tuned for t >= threshold, base below):")
        print("  " + "  ".join(f"{r['threshold']}:{r['fid']:.2f}" for r in f["handover"]))
    print(f"\ntotal {result['seconds']:.0f}s")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18.5, 3.8))
    ax = axes[0]
    labels, means, stds = [], [], []
    shots0 = min(s["shots"] for s in result["summary"])
    for s in result["summary"]:
        if s["shots"] != shots0:
            continue
        labels.append(f"{s['method']}\n{s['peft']}")
        means.append(s["fid_mean"])
        stds.append(s["fid_std"])
        ax.scatter([len(labels) - 1] * len(s["fids"]), s["fids"], color="k", s=8, zorder=3)
    colors = ["tab:gray" if "plain" in lab else "tab:blue" for lab in labels]
    ax.bar(range(len(labels)), means, yerr=stds, color=colors, capsize=3)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    cfg = result["config"]
    ax.set(ylabel=f"FID vs {cfg['eval_data']} (lower is better)",
           title=f"{cfg['base'].removeprefix('pretrain:')} -> {cfg['target'].format(k=shots0)}", )
    ax.title.set_fontsize(8)
    ax = axes[3]
    for s in result["summary"]:
        if s["shots"] != shots0:
            continue
        st = sorted(s["fid_curve_mean"])
        ax.errorbar(st, [s["fid_curve_mean"][x] for x in st], yerr=[s["fid_curve_std"][x] for x in st], marker="o",
                    ms=3, capsize=2, ls="-" if s["method"] == "plain" else "--", label=f"{s['method']} {s['peft']}")
    ax.set(xlabel="fine-tuning step", ylabel="FID (EMA weights)", title=f"FID during training, {shots0} shots")
    ax.legend(fontsize=6)
    ax = axes[1]
    for method, color in (("plain", "tab:gray"), ("diff-tuning", "tab:blue")):
        pts = sorted((s["shots"], s["fid_mean"]) for s in result["summary"] if s["method"] == method
                     and s["peft"] == "none")
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=color, label=method)
    ax.set(xlabel="shots per class", ylabel="FID", title="FID against shots", xscale="log")
    if ax.lines:
        ax.legend()
    ax = axes[2]
    if not result["forgetting"] and result.get("paired"):
        plot_paired(ax, result["paired"])
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    f = result["forgetting"] or {"timesteps": [], "forgetting_relative": []}
    ax.plot(f["timesteps"], f["forgetting_relative"], "k-o", ms=3, label="bank-loss increase (rel.)")
    ax.set(xlabel="t", ylabel="(tuned - base) / base loss on bank", title="chain of forgetting")
    if "handover" in f:
        ax2 = ax.twinx()
        ax2.plot([r["threshold"] for r in f["handover"]], [r["fid"] for r in f["handover"]], "g-s", ms=3,
                 label="hand-over FID")
        ax2.set_ylabel("FID, base model below threshold", color="g")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paired(ax, rows: list[dict]) -> None:
    """Per-seed FID and KID differences against plain fine-tuning (below 0: the method is better)."""
    ax2 = ax.twinx()
    for i, r in enumerate(rows):
        n = len(r["fid_diff"])
        ax.scatter([i - 0.12] * n, r["fid_diff"], color="tab:blue", s=10)
        ax.errorbar(i - 0.12, r["fid_diff_mean"], yerr=r.get("fid_diff_std", 0) / max(n, 1) ** 0.5, fmt="D",
                    color="tab:blue", capsize=3)
        kid = r.get("kid_diff", [])
        if kid:
            ax2.scatter([i + 0.12] * len(kid), kid, color="tab:red", marker="x", s=12)
    ax.axhline(0, color="k", lw=0.8)
    fid_max = max(abs(v) for r in rows for v in r["fid_diff"]) or 1.0
    kid_max = max((abs(v) for r in rows for v in r.get("kid_diff", [])), default=0.0) or 1.0
    ax.set_ylim(-1.1 * fid_max, 1.1 * fid_max)
    ax2.set_ylim(-1.1 * kid_max, 1.1 * kid_max)  # zero at the same height on both axes
    ax.set_xticks(range(len(rows)), [f"{r['method']}\n{r['wins']}/{r['n']} lower" for r in rows], fontsize=7)
    ax.set(ylabel="FID - FID(plain), same seed", title="paired against plain (mean ± s.e.)")
    ax.yaxis.label.set_color("tab:blue")
    ax2.set_ylabel("KID - KID(plain)", color="tab:red")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
