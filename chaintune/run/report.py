"""A self-contained HTML report for a run directory: config, metric curves, sample grids, summary.

Everything is inline (CSS, charts as base64 PNG drawn with matplotlib's Agg canvas, sample grids as
base64 PNG data URIs) so ``report.html`` opens offline, can be mailed or attached to an issue, and
never fetches anything. Charts use matplotlib's object API (no pyplot), so building a report does
not switch the backend of a caller's interactive session.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from chaintune.errors import ChaintuneError
from chaintune.run.rundir import RUN_MARKER, read_run_info
from chaintune.utils.io import atomic_file

REPORT_NAME = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}
h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.good{color:#1a7f37}.bad{color:#b3261e}
.charts{display:flex;flex-wrap:wrap;gap:1em}.charts figure{margin:0}
.grids{display:flex;flex-wrap:wrap;gap:1.2em}.grids figure{margin:0;text-align:center}
.grids img{image-rendering:pixelated;max-width:320px;border:1px solid #ccc}
figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
details summary{cursor:pointer}
.warn{color:#8a6d00}
"""


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Metric records from ``metrics.jsonl`` and the number of unreadable lines skipped.

    A run killed mid-write can leave a truncated last line; the report shows what is readable and
    says how much was skipped rather than refusing to render.
    """
    records: list[dict[str, Any]] = []
    bad = 0
    if not path.exists():
        return records, bad
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metric_series(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``{key: [(step, value), ...]}`` for every numeric key except ``step`` (record order as x when absent)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for i, rec in enumerate(records):
        step = rec.get("step", i)
        if not _is_number(step):
            step = i
        for k, v in rec.items():
            if k != "step" and _is_number(v):
                series.setdefault(k, []).append((float(step), float(v)))
    return series


def _step_of(path: Path) -> int:
    nums = re.findall(r"\d+", path.stem)
    return int(nums[-1]) if nums else -1


def sample_grids(run_dir: Path) -> list[Path]:
    """``samples/*.png`` ordered by the step number in the file name (step_000100.png)."""
    d = run_dir / "samples"
    if not d.is_dir():
        return []
    return sorted((p for p in d.glob("*.png") if p.is_file()), key=lambda p: (_step_of(p), p.name))


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _chart(key: str, points: list[tuple[float, float]]) -> str:
    """One metric curve as a PNG data URI (non-finite values are dropped from the line)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [(s, v) for s, v in points if math.isfinite(v)]
    fig = Figure(figsize=(4.2, 2.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o" if len(pts) <= 30 else None, markersize=3, linewidth=1.3, color="#1f5fa8")
        if len(pts) >= 20:  # a moving average makes noisy per-step rewards readable
            w = max(2, len(pts) // 20)
            smooth = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, linewidth=1.8, color="#d9480f", alpha=0.9)
    else:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _data_uri(buf.getvalue())


def _fmt(v: Any) -> str:
    if _is_number(v):
        v = float(v)
        if not math.isfinite(v):
            return str(v)
        return f"{v:.6g}"
    return str(v)


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict) and d:
        out: list[tuple[str, Any]] = []
        for k, v in d.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix, d)]


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _config_section(info: dict) -> str:
    config = info.get("config")
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(json.dumps(v, default=str) if not isinstance(v, str) else v)}"
                   f"</td></tr>" for k, v in _flatten(config)) if isinstance(config, dict) and config else ""
    body = f"<table>{rows}</table>" if rows else "<p class='meta'>No resolved config recorded.</p>"
    whole = _esc(json.dumps(info, indent=2, default=str))
    return (f"<h2>Configuration</h2>{body}<details><summary>{_esc(RUN_MARKER)} (full)</summary>"
            f"<pre>{whole}</pre></details>")


# which way is good for a metric: a rising nn-distance or FID is reward hacking or forgetting, not progress
LOWER_IS_BETTER = ("nn_distance", "base_distance", "fid", "kid", "loss", "recon", "retention", "kl")
HIGHER_IS_BETTER = ("reward", "class_share", "diversity", "accuracy")


def metric_direction(key: str) -> int:
    """+1 when a larger value is better, -1 when a smaller one is, 0 when neither (lr, time, grad_norm)."""
    name = key.rsplit("/", 1)[-1]
    if name.endswith(("_se", "_std")):  # the spread of a metric is neither good nor bad
        return 0
    if any(k in name for k in LOWER_IS_BETTER):
        return -1
    if any(k in name for k in HIGHER_IS_BETTER):
        return 1
    return 0


def _hacking_section(info: dict) -> str:
    events = info.get("hacking") or []
    if not events:
        return ""
    rows = "".join(f"<tr><td class='num'>{_esc(e.get('step'))}</td><td>{_esc(e.get('reason'))}</td>"
                   f"<td>{_esc(e.get('action'))}</td></tr>" for e in events)
    final = f"<p>Final model: <b>{_esc(info['final_model'])}</b></p>" if info.get("final_model") else ""
    return (f"<h2 class='warn'>Reward hacking detected</h2>{final}<table><tr><th>step</th><th>what the guard saw"
            f"</th><th>action</th></tr>{rows}</table>")


def _pilot_section(info: dict) -> str:
    """``align --pilot``: the probes and the choice (a table before the run's own metrics)."""
    pilot = info.get("pilot")
    if not isinstance(pilot, dict) or not pilot.get("probes"):
        return ""
    chosen = pilot.get("chosen") or {}
    keys = list(dict.fromkeys(k for p in pilot["probes"] for k in (p.get("settings") or {})))
    rows = "".join(
        "<tr>" + "".join(f"<td>{_esc(_fmt((p.get('settings') or {}).get(k)))}</td>" for k in keys)
        + f"<td class='num'>{_esc(_fmt(p.get('start')))}</td><td class='num'>{_esc(_fmt(p.get('score')))}</td>"
        f"<td>{_esc('; '.join(p.get('alarms') or []) or 'none')}</td>"
        f"<td>{'chosen' if p.get('settings') == chosen else ''}</td></tr>" for p in pilot["probes"])
    what = _esc(pilot.get("score", "score"))
    sched = pilot.get("schedule")
    derived = (f"<p>Derived from the best plain probe's chain of forgetting (its gain on held-out images centres on "
               f"t = {_esc(_fmt(sched.get('gain_mean_t')))}): alpha {_esc(_fmt(sched.get('alpha')))}, beta "
               f"{_esc(_fmt(sched.get('beta')))}, lambda {_esc(_fmt(sched.get('lam')))}.</p>"
               if isinstance(sched, dict) else "")
    return (f"<h2>Pilot ({_esc(pilot.get('steps'))} steps a probe)</h2><table><tr>"
            + "".join(f"<th>{_esc(k)}</th>" for k in keys)
            + f"<th>{what} at start</th><th>{what} at end</th><th>alarms</th><th></th></tr>{rows}</table>"
            + derived)


# fractions of evaluation samples (binomial noise): shares of a class, of clips that move the prompt's way ...
SHARE_METRICS = ("class_share", "identity", "direction", "follows_prompt")
RELATIVE_NOISE = 0.01  # without a standard error, a change under 1% of the value is taken as evaluation noise


def change_noise(key: str, v0: float, v1: float, se: tuple[float | None, float | None] = (None, None),
                 n: int | None = None) -> float:
    """How large a change of ``key`` from ``v0`` to ``v1`` evaluation noise alone makes: twice the standard error
    of the difference when the run logged ``KEY_se``; for shares, twice the binomial one over ``n`` samples;
    otherwise :data:`RELATIVE_NOISE` of the value. A change within it is not coloured good or bad."""
    if se[0] is not None and se[1] is not None:
        return 2 * math.hypot(se[0], se[1])
    if key.rsplit("/", 1)[-1] in SHARE_METRICS and n and 0 <= v0 <= 1 and 0 <= v1 <= 1:
        return 2 * math.sqrt((v0 * (1 - v0) + v1 * (1 - v1)) / n)
    return RELATIVE_NOISE * max(abs(v0), abs(v1))


def _delivered_step(info: dict) -> int | None:
    """The step whose weights model/ holds when it is not the last one (``final_model: best (step N)``)."""
    m = re.fullmatch(r"best \(step (\d+)\)", str(info.get("final_model", "")))
    return int(m.group(1)) if m else None


def _table_section(series: dict[str, list[tuple[float, float]]], info: dict | None = None) -> str:
    """First vs delivered: the model the run saved (the kept best evaluation, when the guard or ``final_model best``
    chose one) against the first evaluation, beside the last logged value. Changes within evaluation noise
    (:func:`change_noise`) are not coloured."""
    if not series:
        return ""
    info = info or {}
    kept = _delivered_step(info)
    n = (info.get("config") or {}).get("eval_samples")
    rows = []
    for key, pts in series.items():
        (s0, v0), (s1, v1) = pts[0], pts[-1]
        at = dict(pts)
        sd, vd = (kept, at[kept]) if kept is not None and kept in at else (s1, v1)
        finite = [v for _, v in pts if math.isfinite(v)]
        delta = vd - v0 if math.isfinite(vd - v0) else float("nan")
        se = dict(series.get(key + "_se", []))
        noise = change_noise(key, v0, vd, (se.get(s0), se.get(sd)), n if isinstance(n, int) else None)
        good = delta * metric_direction(key) if abs(delta) > noise else 0.0
        cls = "good" if good > 0 else "bad" if good < 0 else ""
        lo = _fmt(min(finite)) if finite else "–"
        hi = _fmt(max(finite)) if finite else "–"
        rows.append(f"<tr><th>{_esc(key)}</th><td class='num'>{_fmt(v0)}</td><td class='num'>{_fmt(s0)}</td>"
                    f"<td class='num'>{_fmt(vd)}</td><td class='num'>{_fmt(sd)}</td>"
                    f"<td class='num {cls}'>{_fmt(delta)}</td><td class='num'>{_fmt(v1)}</td>"
                    f"<td class='num'>{_fmt(s1)}</td><td class='num'>{lo}</td><td class='num'>{hi}</td>"
                    f"<td class='num'>{len(pts)}</td></tr>")
    what = (f"the delivered model (model/) is the best evaluation, step {kept}, not the last"
            if kept is not None else "the delivered model (model/) is that of the last step")
    head = ("<tr><th>metric</th><th>first</th><th>at step</th><th>delivered</th><th>at step</th><th>change</th>"
            "<th>last</th><th>at step</th><th>min</th><th>max</th><th>points</th></tr>")
    note = (f"<p class='meta'>{_esc(what)}; change = delivered - first, coloured only beyond evaluation noise "
            "(twice its standard error).</p>")
    return f"<h2>Metrics: first vs delivered</h2>{note}<table>{head}{''.join(rows)}</table>"


def _curves_section(series: dict[str, list[tuple[float, float]]], bad_lines: int, has_file: bool) -> str:
    note = f"<p class='warn'>{bad_lines} unreadable line(s) in metrics.jsonl were skipped.</p>" if bad_lines else ""
    if not series:
        msg = "metrics.jsonl holds no numeric metrics yet." if has_file else "No metrics.jsonl in this run."
        return f"<h2>Curves</h2>{note}<p class='meta'>{msg}</p>"
    figs = "".join(f"<figure><img alt='{_esc(k)}' src='{_chart(k, pts)}'></figure>" for k, pts in series.items())
    return f"<h2>Curves</h2>{note}<div class='charts'>{figs}</div>"


def _samples_section(grids: list[Path]) -> str:
    if not grids:
        return "<h2>Samples</h2><p class='meta'>No sample grids (samples/*.png) yet.</p>"
    figs = []
    for p in grids:
        step = _step_of(p)
        caption = f"step {step}" if step >= 0 else p.stem
        clip = p.with_suffix(".gif")  # a video run's animated grid beside its strip of frames
        anim = (f"<img alt='{_esc(clip.name)}' src='{_data_uri(clip.read_bytes(), 'image/gif')}'>"
                if clip.is_file() else "")
        names = _esc(p.name) + (f" + {_esc(clip.name)} (animated)" if anim else "")
        figs.append(f"<figure>{anim}<img alt='{_esc(p.name)}' src='{_data_uri(p.read_bytes())}'>"
                    f"<figcaption>{_esc(caption)} — {names}</figcaption></figure>")
    return f"<h2>Samples</h2><div class='grids'>{''.join(figs)}</div>"


def render_report(run_dir: str | Path) -> str:
    """The report's HTML as a string (see :func:`build_report`)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ChaintuneError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise ChaintuneError(f"{run_dir} is not a run directory (not a directory)")
    info = read_run_info(run_dir)
    if not isinstance(info, dict):
        raise ChaintuneError(f"{run_dir / RUN_MARKER} is corrupt: expected a JSON object")
    metrics_path = run_dir / "metrics.jsonl"
    records, bad = read_metrics(metrics_path)
    series = metric_series(records)
    title = f"chaintune run: {run_dir.resolve().name}"
    meta_keys = ("command", "base_model", "peft", "status", "updated")
    meta = " · ".join(f"{k}: <b>{_esc(info[k])}</b>" for k in meta_keys if k in info)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1><p class='meta'>{meta}</p><p class='meta'>{_esc(run_dir.resolve())}</p>",
        _hacking_section(info),
        _pilot_section(info),
        _table_section(series, info),
        _curves_section(series, bad, metrics_path.exists()),
        _samples_section(sample_grids(run_dir)),
        _config_section(info),
        "</body></html>\n",
    ]
    return "\n".join(p for p in parts if p)


def build_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` atomically (a reader never sees half a report) and return its path."""
    run_dir = Path(run_dir)
    text = render_report(run_dir)
    out = run_dir / REPORT_NAME
    with atomic_file(out, "wb") as f:  # bytes: UTF-8 whatever the locale says
        f.write(text.encode("utf-8"))
    return out


__all__ = ["build_report", "render_report", "read_metrics", "metric_series", "sample_grids", "REPORT_NAME"]
