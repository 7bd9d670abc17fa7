"""``--pilot``: short probe runs that choose the settings on the user's own model and data or reward, before the GPU
hours of the full run (``chaintune align`` and ``chaintune transfer``).

Why: chaintune's defaults were measured on the built-in digits; a learning rate that aligns them may hack another
reward in ten steps or not move a larger model at all, and whether Diff-Tuning beats plain fine-tuning depends on the
data. Each probe is the full run's configuration for ``--pilot-steps`` (a fifth of ``--steps``, at least 10) at one
point of the grid, evaluated on held-out samples:

* ``align``: (estimator, LR), judged by the held-out reward (the judge training never sees; the training reward
  where a reward has no twin), with the hacking guard on: a probe that raised an alarm is not chosen;
* ``transfer``: (method, LR), judged by FID against held-out images (the data's test split, else its last 10%,
  held out of the probes' training); with ``--pilot-schedule``, Diff-Tuning once more with ψ/ξ (alpha, beta) and lam
  derived from the chain-of-forgetting measurement of the best plain probe
  (:func:`chaintune.transfer.forgetting.derive_schedule`).

The pilot keeps the best probe; probes write nothing to disk, and what they measured goes into the full run's status
file and report.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from chaintune.errors import ChaintuneError

__all__ = ["Probe", "run_pilot", "choose", "pilot_steps", "parse_lrs"]


@dataclasses.dataclass
class Probe:
    settings: dict  # the grid point, e.g. {"estimator": "rlr", "lr": 1e-4}
    score: float  # higher is better: the held-out reward, or -FID
    start: float  # the same at step 0
    alarms: list[str]
    seconds: float

    @property
    def usable(self) -> bool:
        return not self.alarms and self.score == self.score  # no alarm, not NaN

    def label(self) -> str:
        return " ".join(f"{k} {v:g}" if isinstance(v, float) else f"{v}" for k, v in self.settings.items())


# runs a probe's config without writing anything: (score at the end, score at step 0, the alarms' reasons)
Fit = Callable[[Any], tuple[float, float, list[str]]]


def pilot_steps(steps: int, pilot: int) -> int:
    """``pilot`` steps a probe, or a fifth of the run's (at least 10, never more than the run)."""
    return pilot or min(steps, max(10, steps // 5))


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ChaintuneError(f"--pilot-lrs must be numbers separated by commas, got {text!r}") from None
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ChaintuneError(f"--pilot-lrs must be positive numbers, got {text!r}")
    return lrs


def choose(probes: list[Probe]) -> Probe:
    """The probe with the highest score that raised no alarm."""
    usable = [p for p in probes if p.usable]
    if not usable:
        raise ChaintuneError("every pilot probe raised a hacking alarm or diverged (" + "; ".join(
            f"{p.label()}: {p.alarms[0] if p.alarms else 'NaN'}" for p in probes) + "); give lower --pilot-lrs")
    return max(usable, key=lambda p: p.score)


def run_pilot(cfg: Any, grid: list[dict], apply: Callable[[Any, dict], None], steps: int, fit: Fit, *,
              score_name: str, log: Callable[[str], None] = print,
              follow_up: Callable[[list[Probe]], list[dict]] | None = None) -> tuple[Any, dict]:
    """Probe every point of ``grid`` (``apply(config, point)`` sets it on a copy of ``cfg``) for ``steps``, then the
    points ``follow_up(probes)`` derives from those probes (if given), choose, and return the full run's config (the
    chosen point applied) with the record of the pilot."""
    log(f"pilot: {len(grid)} probes of {steps} steps, judged by {score_name}")
    probes: list[Probe] = []

    def probe(point: dict, total: int) -> None:
        c = copy.deepcopy(cfg)
        apply(c, point)
        t0 = time.time()
        score, start, alarms = fit(c)
        probes.append(p := Probe(point, score, start, alarms, round(time.time() - t0, 1)))
        log(f"pilot {len(probes)}/{total}: {p.label()}: {score_name} "
            + (f"{start:.4g} -> " if start == start else "") + f"{score:.4g}"
            + (f"; alarm: {alarms[0]}" if alarms else "") + f" ({p.seconds:.0f} s)")

    for point in grid:
        probe(point, len(grid))
    more = follow_up(probes) if follow_up is not None else []
    for point in more:
        probe(point, len(grid) + len(more))
    best = choose(probes)
    log(f"pilot: chose {best.label()} ({score_name} {best.score:.4g}); the full run starts")
    full = copy.deepcopy(cfg)
    apply(full, best.settings)
    record = {"steps": steps, "score": score_name, "chosen": best.settings,
              "probes": [dataclasses.asdict(p) for p in probes]}
    return full, record
