"""How patient the hacking guard should be: its alarms replayed on alignment runs that ran without it.

``benchmarks/defaults.py`` runs every setting with the guard off (``on_hacking off``) and logs every
evaluation, so each run shows what it does by itself: some pass through a short excursion (nn-distance
above 1.3x the base model's at step 25, back to 1.0-1.1x by step 75) and end as good digits, others keep
drifting and end as noise. This script feeds each run's evaluations, in order, to the guard the trainer uses
(:class:`chaintune.align.HackingGuard`) and asks, for a patience of p evaluations in a row
(``--hacking-patience``): when would the guard have acted?

A run *ends hacked* when its final evaluation breaks the guard's own bounds (nn-distance above 1.3x the base
model's, or diversity below 0.5x): that is what the guard exists to prevent. Per patience:

* ``false alarms``: runs that end well (guard off) but that the guard would have rolled back. A rollback
  at step 25 restarts from the base weights at half the LR, and such runs end worse (docs/results.md,
  "Defaults": lr 2e-4 on digit:7 ended at 73% under the guard, 98% without);
* ``caught`` / ``missed``: runs that end hacked and are / are not acted on before the end;
* ``delay``: evaluations between the first alarm and the action, for the caught runs.

Whatever the patience, the delivered model (``final_model best``) is never an alarmed evaluation: the guard
keeps as best only evaluations without an alarm.

    python benchmarks/guard.py          # replays the cached runs of benchmarks/defaults.py (seconds)
    python benchmarks/guard.py --quick  # replays the curves stored in benchmarks/results/guard.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from chaintune.align.config import GuardConfig

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]

PATIENCES = (1, 2, 3)
_DEFAULT_GUARD = GuardConfig()  # the bounds it replays are the default guard's (issue 13's acceptance bounds)
TOLERANCE, COLLAPSE = _DEFAULT_GUARD.realism_tolerance, _DEFAULT_GUARD.collapse_ratio


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--runs", type=Path, default=C.RESULTS / "tmp" / "defaults_runs",
                   help="per-run JSONs written by benchmarks/defaults.py (guard off)")
    return p.parse_args(argv)


def load_curves(args) -> list[dict]:
    """Every guard-off run's evaluations: from defaults.py's cache, or (``--quick``, or no cache) guard.json."""
    cache = sorted(args.runs.glob("*.json")) if args.runs.is_dir() else []
    runs = []
    for f in cache:
        if f.name.endswith(".spec.json"):
            continue
        r = json.loads(f.read_text())
        opts = r.get("opts", {})
        if opts.get("on_hacking", "off") != "off" or any("eval/nn_distance" not in e for e in r["evals"]):
            continue  # a guarded run's curve is already changed by the guard; JPEG runs log no realism metric
        runs.append({"setting": r["setting"], "target": r["target"], "seed": r["seed"], "evals": r["evals"]})
    if runs and not args.quick:
        return runs
    stored = C.RESULTS / "guard.json"
    return json.loads(stored.read_text())["curves"]


def replay(evals: list[dict], patience: int) -> dict:
    """When the guard, fed these evaluations, would first act (None: never), and its first alarm."""
    from chaintune.align import HackingGuard

    guard = HackingGuard(TOLERANCE, COLLAPSE)
    streak, first_alarm = 0, None
    for e in evals:
        alarm = guard.alarm(dict(e))
        streak = streak + 1 if alarm else 0
        if alarm and first_alarm is None:
            first_alarm = e["step"]
        if streak >= patience:
            return {"acts_at": e["step"], "first_alarm": first_alarm, "reason": alarm}
    return {"acts_at": None, "first_alarm": first_alarm, "reason": None}


def ends_hacked(evals: list[dict]) -> bool:
    z, f = evals[0], evals[-1]
    return (f["eval/nn_distance"] > TOLERANCE * z["eval/nn_distance"]
            or f["eval/diversity"] < COLLAPSE * z["eval/diversity"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    curves = load_curves(args)
    every = statistics.median(r["evals"][1]["step"] - r["evals"][0]["step"] for r in curves)
    rows, per_run = [], []
    for r in curves:
        hacked = ends_hacked(r["evals"])
        acts = {p: replay(r["evals"], p) for p in PATIENCES}
        per_run.append({"setting": r["setting"], "target": r["target"], "seed": r["seed"], "ends_hacked": hacked,
                        "final_nn_ratio": r["evals"][-1]["eval/nn_distance"] / r["evals"][0]["eval/nn_distance"],
                        **{f"acts_at_p{p}": a["acts_at"] for p, a in acts.items()},
                        "first_alarm": acts[1]["first_alarm"]})
    n_hacked = sum(r["ends_hacked"] for r in per_run)
    for p in PATIENCES:
        key = f"acts_at_p{p}"
        good = [r for r in per_run if not r["ends_hacked"]]
        bad = [r for r in per_run if r["ends_hacked"]]
        caught = [r for r in bad if r[key] is not None]
        delays = [(r[key] - r["first_alarm"]) / every for r in caught]
        rows.append({"patience": p, "runs": len(per_run), "ends_hacked": n_hacked,
                     "false_alarms": sum(r[key] is not None for r in good), "ends_well": len(good),
                     "caught": len(caught), "missed": len(bad) - len(caught),
                     "mean_delay_evals": statistics.mean(delays) if delays else None,
                     "acts_at": sorted(r[key] for r in caught)})
    result = {"config": {"tolerance": TOLERANCE, "collapse": COLLAPSE, "eval_every": every,
                         "source": str(args.runs)}, "table": rows, "runs": per_run, "curves": curves}
    out = C.out_dir(args)
    C.write_json(out / "guard.json", result)
    plot(result, out / "guard.png")
    print(C.table(rows, [("patience", "patience", "d"), ("runs", "runs", "d"), ("ends_well", "end well", "d"),
                         ("false_alarms", "false alarms", "d"), ("ends_hacked", "end hacked", "d"),
                         ("caught", "caught", "d"), ("missed", "missed", "d"),
                         ("mean_delay_evals", "delay (evals)", ".1f")],
                  title=f"hacking guard replayed on {len(per_run)} guard-off runs (evaluation every {every:g} steps)"))
    return result


def plot(result: dict, path: Path) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in result["curves"]:
        e = c["evals"]
        hacked = ends_hacked(e)
        ax.plot([x["step"] for x in e], [x["eval/nn_distance"] / e[0]["eval/nn_distance"] for x in e],
                color="C3" if hacked else "C0", alpha=0.5, lw=1)
    ax.axhline(TOLERANCE, color="k", ls=":", lw=1)
    ax.set(xlabel="step", ylabel="nn-distance / base", yscale="log",
           title="guard-off runs: red ends hacked, blue ends as digits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
