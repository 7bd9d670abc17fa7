"""Shared helpers of the alignment-side benchmarks: arguments, one-thread setup, tables, JSON/PNG, peak memory.

Peak memory (used by ``memory.py`` and ``alignment.py``): each configuration runs in a forked child
process. The child resets its resident-set high-water mark (``/proc/self/clear_refs`` = 5, Linux),
reads its RSS, runs the work, and reports ``ru_maxrss`` (the high-water mark) minus that RSS: the
extra resident memory the work needed at its peak (activations, saved tensors, gradients, parameter
copies). Forking keeps the parent's imports and loaded model, so a configuration costs no re-import;
a fresh child makes the measurement independent of what ran before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def setup_threads(n: int = 1) -> None:
    """One torch thread: the models are tiny, and more threads on a shared 2-core box only oversubscribe."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the shared ``--quick``, ``--out`` and ``--seed`` options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run (< 90 s)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results; --quick: benchmarks/results/tmp)")
    p.add_argument("--seed", type=int, default=0)
    return p


def out_dir(args: argparse.Namespace) -> Path:
    out = args.out or (RESULTS / "tmp" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    return out


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: Path, labels: Sequence[str], values: Sequence[float], ylabel: str, *, title: str | None = None,
              colors: Sequence[str] | None = None, size: tuple[float, float] = (5, 3)) -> None:
    """One bar per label, written to ``path`` (the PNG of a benchmark whose result is a short list of numbers)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=size)
    ax.bar(list(labels), list(values), color=colors)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return format(v, spec)
    return str(v)


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]], title: str | None = None) -> str:
    """A plain-text table. ``columns``: (key, header, format spec)."""
    cells = [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    line = lambda xs: "  ".join(
        x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths, strict=True)))
    out = ([title] if title else []) + [line(heads), "  ".join("-" * w for w in widths)] + [line(c) for c in cells]
    return "\n".join(out)


def measure_in_child(fn: Callable[[], dict | None]) -> dict:
    """Run ``fn`` in a forked child; return its result dict plus ``peak_mib`` (see module docstring)
    and ``seconds``. Errors come back as ``{"error": ...}``. One probe for every benchmark and
    ``chaintune plan``: :func:`chaintune.plan.memory.measure_peak`."""
    from chaintune.plan.memory import measure_peak

    res = measure_peak(fn)
    if "peak_bytes" in res:
        res["peak_mib"] = res.pop("peak_bytes") / 2**20
        res["rss_before_mib"] = res.pop("rss_before_bytes") / 2**20
    return res

def log(msg: str) -> None:
    print(msg, flush=True)
    sys.stdout.flush()


def memory_row(label: str, r: dict) -> str:
    """One measured configuration as a log line: ``label``, method, T, peak MiB, seconds, time ratio, skip reason."""
    return (f"  {label} {r['method']:20s} T={r['T']:<3d} "
            f"peak {r.get('peak_mib', float('nan')):9.1f} MiB  {r.get('seconds', float('nan')):7.2f} s"
            + (f"  x{r['time_ratio']:.1f}" if "time_ratio" in r else "")
            + (f"  SKIPPED: {r['skipped']}" if r.get("skipped") else ""))
