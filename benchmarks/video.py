"""Text-to-video: memory/time of one gradient estimate vs chain length and frames, and alignment of the video model.

The model is ``--model`` (default ``builtin:moving-digits``: a pixel-space Wan 2.1 transformer with a UMT5
prompt encoder that makes 16x16 clips of a digit moving as the prompt says, "a 7 moving left"; any chaintune
video model id or run directory works). Two parts, chosen with ``--parts``:

**memory** — peak extra memory and time of ONE ``chaintune.estimate_gradient`` (batch ``--n`` = 2, prompts
drawn from the model's default prompts) at each clip length F in ``--frames`` (``model.set_video_shape(F, H,
W)``) and chain length T in ``--steps``, per trainable set (``--peft``: LoRA rank 4 on the attention
projections, or all weights) and per estimator of ``benchmarks/scale.py``'s ``METHODS`` table: full backprop
with and without gradient checkpointing, AlignProp = truncated backprop k = 1, DDPO = REINFORCE, RLR h = 1 and
h = 2. The reward is a differentiable video reward from the registry (``--memory-reward``, default
``moving-digit``: log p(prompt's digit) of every frame's ink-centroid crop), so the first-order estimators
backpropagate through it. Each configuration runs through :func:`chaintune.plan.memory.measure_peak` (the
probe ``chaintune plan`` and ``scale.py`` use): on CPU a forked child reports its peak RSS above the loaded
model, on CUDA the allocator's peak. ``time_ratio`` is the estimate's seconds over a no-grad sampling of the
same n clips and T steps (the "no-grad sampling" row: fastest of 3 runs, largest peak). A configuration
past ``--timeout`` seconds or ``--max-gib`` of extra memory is killed and recorded as skipped, with the reason;
a method skipped that way is not run again at a longer chain or more frames (recorded as skipped, "not run").
Memory is RSS on CPU: expect tens of MiB of allocator noise between rows. What to look for: RLR's (and
AlignProp's, DDPO's) memory is flat in T and grows with frames only as one chain step's activations do; full
backprop without checkpointing grows linearly in T x frames, with checkpointing linearly in T at a much smaller
slope. ``growth`` in the JSON is each method's slope in MiB per chain step.

**align** — ``chaintune.align.align`` for every estimator in ``--methods`` (RLR at AlignConfig's
defaults, AlignProp = truncated backprop k = 1, DDPO = REINFORCE, GRPO, full backprop; everything else is
AlignConfig's default: all weights train (peft none), KL guard 0.01, hacking guard with rollback, best-evaluation
final model) on reward ``--reward`` (default ``moving-digit``, prompt fidelity) for ``--align-steps`` steps of
batch ``--batch`` over ``--sample-steps`` chain steps, evaluating every ``--eval-every`` steps on
``--eval-samples`` clips, for each seed in ``--seeds``. Recorded per evaluation (from the run's
``metrics.jsonl``): samples seen, ``seconds`` (the training loop's clock, evaluations included),
``train_seconds`` (evaluations excluded, ``benchmarks/alignment.step_seconds``), eval/reward,
eval/heldout_reward (the reward's held-out twin: the same crop read by the digit MLP training never saw), and
the video judge: eval/identity (share of frames read as the prompt's digit), eval/direction (share of clips
moving the prompt's way), eval/follows_prompt (both), eval/nn_distance (frames' distance to the nearest real
digit; rising = reward hacking). Prompts are the model's default prompts (``builtin:moving-digits`` when the
model ships none). GRPO draws its prompts in groups of ``group_size`` (4 by default for grpo: its baseline
normalises rewards within the samples of one prompt, and a sample alone in its group gets advantage 0);
``zero_grad_steps`` counts the steps whose gradient was exactly 0.

Writes ``video.json``, ``video.png`` (memory vs T per estimator for each frame count; reward, held-out reward
and judge vs samples and vs training seconds) and prints the tables. One torch thread.

    python benchmarks/video.py                                   # both parts (memory: minutes; align: much longer)
    python benchmarks/video.py --parts memory --peft lora,full   # memory only, both trainable sets
    python benchmarks/video.py --parts align --seeds 0,1,2       # alignment curves, three seeds
    python benchmarks/video.py --model runs/my-video-model --out /tmp/video   # another model, elsewhere
    python benchmarks/video.py --quick                           # CI smoke (< 90 s, benchmarks/results/tmp)

``--resume`` keeps the rows and runs of an existing ``video.json`` in ``--out`` (same model) and measures
only what is missing.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import _common as C
    from benchmarks import scale
    from benchmarks.alignment import step_seconds
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]
    import scale  # type: ignore[no-redef]
    from alignment import step_seconds  # type: ignore[no-redef]

METHODS = scale.METHODS  # memory part: label -> (estimator, options, gradient checkpointing)

# align part: every estimator at AlignConfig's defaults except the options named here
ALIGN_METHODS: dict[str, dict] = {
    "rlr": {"estimator": "rlr"},
    "alignprop k=1": {"estimator": "truncated-backprop", "k": 1},
    "ddpo": {"estimator": "reinforce"},
    "grpo": {"estimator": "grpo"},
    "full-backprop": {"estimator": "full-backprop"},
}
EVAL_KEYS = ("eval/reward", "eval/heldout_reward", "eval/identity", "eval/direction", "eval/follows_prompt",
             "eval/nn_distance")
FALLBACK_PROMPTS = "builtin:moving-digits"
QUICK = {"frames": "4", "steps": "3,5", "memory_methods": "rlr h=2,full-backprop", "peft": "lora",
         "methods": "rlr,full-backprop", "align_steps": 2, "eval_every": 1, "eval_samples": 4, "batch": 4,
         "sample_steps": 5, "timeout": 30.0}


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--model", default="builtin:moving-digits", help="video model id (builtin, run dir, pipeline dir)")
    p.add_argument("--parts", default="memory,align", help="comma list of memory, align")
    # memory
    p.add_argument("--frames", default="8,16", help="memory: comma list of clip lengths (frames)")
    p.add_argument("--steps", default="10,20,50", help="memory: comma list of chain lengths T")
    p.add_argument("--memory-methods", default=",".join(METHODS), help="memory: comma list of scale.py METHODS")
    p.add_argument("--peft", default="lora", help="memory: trainable sets, comma list of lora (rank 4), full")
    p.add_argument("--memory-reward", default="moving-digit", help="memory: a differentiable video reward")
    p.add_argument("--n", type=int, default=2, help="memory: clips per estimate (even: RLR pairs samples)")
    p.add_argument("--device", default="cpu", help="memory: cpu (forked child, RSS) or cuda (allocator peak)")
    p.add_argument("--timeout", type=float, default=90.0, help="memory: seconds before a configuration is skipped")
    p.add_argument("--max-gib", type=float, default=8.0, help="memory: extra GiB before a configuration is skipped")
    # align
    p.add_argument("--methods", default=",".join(ALIGN_METHODS),
                   help=f"align: comma list of {', '.join(ALIGN_METHODS)}")
    p.add_argument("--reward", default="moving-digit", help="align: training reward")
    p.add_argument("--align-steps", type=int, default=30, help="align: optimizer steps per run")
    p.add_argument("--batch", type=int, default=16, help="align: clips per step")
    p.add_argument("--sample-steps", type=int, default=10, help="align: chain length T")
    p.add_argument("--eval-every", type=int, default=5, help="align: evaluate every N steps (and at 0 and the end)")
    p.add_argument("--eval-samples", type=int, default=32, help="align: clips per evaluation")
    p.add_argument("--lr", type=float, default=None, help="align: learning rate (default: AlignConfig's)")
    p.add_argument("--seeds", default="0", help="align: comma list of seeds")
    p.add_argument("--runs", type=Path, default=None, help="align: keep the run dirs here (default: a temp dir)")
    p.add_argument("--resume", action="store_true", help="keep the existing video.json's rows, measure the rest")
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    a.part_list = [x for x in a.parts.split(",") if x]
    a.frames_list = [int(x) for x in str(a.frames).split(",") if x]
    a.steps_list = [int(x) for x in str(a.steps).split(",") if x]
    a.memory_list = [x for x in a.memory_methods.split(",") if x]
    a.peft_list = [x for x in a.peft.split(",") if x]
    a.method_list = [x for x in a.methods.split(",") if x]
    a.seed_list = [int(x) for x in str(a.seeds).split(",") if x]
    checks = [(a.part_list, ("memory", "align"), "part"), (a.memory_list, METHODS, "memory method"),
              (a.peft_list, ("lora", "full"), "peft"), (a.method_list, ALIGN_METHODS, "align method")]
    for given, known, what in checks:
        bad = [x for x in given if x not in known]
        if bad:
            p.error(f"unknown {what} {bad}; choose from {', '.join(known)}")
    return a


# ------------------------------------------------------------------------------------------------- memory


def _mkey(r: dict) -> tuple:
    return (r["peft"], r["frames"], r["method"], r["T"])


def default_prompts(model) -> str:
    """The prompt source the model ships (``default_prompts``), else the moving-digits prompts."""
    return getattr(model, "default_prompts", None) or FALLBACK_PROMPTS


def pick_prompts(model, n: int, seed: int) -> list[str]:
    import torch

    from chaintune.prompts import load_prompts

    pool = load_prompts(default_prompts(model)).prompts
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return [pool[i] for i in idx.tolist()]


def run_memory(args, state: dict, save) -> None:
    """Measure every (peft, frames, T, method) not yet in ``state['memory']['rows']``; ``save()`` after each row."""
    import torch

    import chaintune
    from chaintune.adapters import apply_lora
    from chaintune.plan.memory import measure_peak
    from chaintune.rewards import get_reward

    mem = state["memory"]
    rows, models = mem["rows"], mem["models"]
    done = {_mkey(r) for r in rows if "peak_mib" in r or r.get("skipped")}
    reward = get_reward(args.memory_reward)
    if not reward.differentiable:
        raise SystemExit(f"--memory-reward {args.memory_reward!r} is a black-box reward; the first-order "
                         "estimators need a differentiable one (e.g. moving-digit, motion, smoothness)")
    max_bytes = int(args.max_gib * 2**30)
    for peft in args.peft_list:
        if all((peft, f, m, T) in done for f in args.frames_list for T in args.steps_list
               for m in ["no-grad sampling", *args.memory_list]):
            continue
        C.log(f"loading {args.model} for {peft} ...")
        model = chaintune.load(args.model, device=args.device)  # fresh per trainable set: no LoRA in the full run
        if not model.produces_video:
            raise SystemExit(f"{args.model} makes images; this benchmark is for video models")
        if peft == "lora":
            apply_lora(model.denoiser, rank=4)
        else:
            model.denoiser.requires_grad_(True)
        trainable = sum(p.numel() for p in model.denoiser.parameters() if p.requires_grad)
        prompts = pick_prompts(model, args.n, args.seed)
        h, w = model.height, model.width
        models[peft] = {"model": args.model, "kind": model.kind, "source": str(model.source),
                        "parameters": sum(p.numel() for p in model.denoiser.parameters()),
                        "trainable_parameters": trainable, "dtype": str(model.dtype).replace("torch.", ""),
                        "pixel_space": bool(getattr(model, "pixel_space", False)), "height": h, "width": w,
                        "prompt_source": default_prompts(model), "prompts": prompts,
                        "latent_shapes": {}}
        for F in args.frames_list:
            model.set_video_shape(F, h, w)
            models[peft]["latent_shapes"][str(F)] = list(model.latent_shape)
            # warm-up in this process (lazy initialisations, the reward's classifier), so children measure the estimate
            chaintune.estimate_gradient(model, reward, "rlr", n=1, steps=2, eta=1.0, h=1, prompts=prompts[:1],
                                        generator=torch.Generator().manual_seed(0))
            for T in args.steps_list:
                base = {"peft": peft, "frames": F, "T": T, "trainable_parameters": trainable}
                skey = (peft, F, "no-grad sampling", T)
                if skey in done:
                    sample = next(r for r in rows if _mkey(r) == skey)
                else:
                    def sampling(model=model, T=T, prompts=prompts) -> dict:
                        chaintune.sample(model, args.n, steps=T, eta=1.0, prompts=prompts,
                                         generator=torch.Generator().manual_seed(0))
                        return {}

                    # the time reference of every ratio: the fastest of 3 (one shot is noisy on a shared CPU)
                    reps = [scale._clean(measure_peak(sampling, args.device, timeout=args.timeout,
                                                      max_bytes=max_bytes)) for _ in range(3)]
                    ok = [r for r in reps if "peak_mib" in r]
                    sample = {**base, "method": "no-grad sampling", **(min(ok, key=lambda r: r["seconds"]) if ok
                                                                       else reps[0])}
                    if ok:
                        sample.update(peak_mib=max(r["peak_mib"] for r in ok),
                                      seconds_all=[r["seconds"] for r in ok])
                    rows.append(sample)
                    _report(sample)
                    save()
                for label in args.memory_list:
                    if (peft, F, label, T) in done:
                        continue
                    est, opts, ckpt = METHODS[label]
                    row = {**base, "method": label, "estimator": est, "checkpoint": ckpt}
                    failed = _failed_before(rows, peft, F, label, T)
                    if failed is not None:  # it did not fit a shorter chain / fewer frames: it will not fit this one
                        row.update(skipped=f"not run: {failed['skipped']} at {failed['frames']} frames, "
                                           f"T={failed['T']}", not_run=True)
                    else:
                        def work(model=model, est=est, opts=opts, ckpt=ckpt, T=T, prompts=prompts) -> dict:
                            g = chaintune.estimate_gradient(model, reward, est, n=args.n, steps=T, eta=1.0,
                                                            checkpoint=ckpt, prompts=prompts,
                                                            generator=torch.Generator().manual_seed(args.seed), **opts)
                            return {"grad_norm": float(torch.sqrt(sum((v.float() ** 2).sum() for v in g.values())))}

                        row.update(scale._clean(measure_peak(work, args.device, timeout=args.timeout,
                                                             max_bytes=max_bytes)))
                        if "seconds" in row and "peak_mib" in row and sample.get("seconds"):
                            row["time_ratio"] = row["seconds"] / sample["seconds"]
                    rows.append(row)
                    _report(row)
                    save()
        del model
    mem["growth"] = growth(rows)


def _failed_before(rows: list[dict], peft: str, F: int, label: str, T: int) -> dict | None:
    """A row of ``label`` at no more frames and no longer chain that timed out or ran over the memory cap."""
    for r in rows:
        if (r["peft"] == peft and r["method"] == label and r["frames"] <= F and r["T"] <= T
                and (r.get("timed_out") or r.get("over_memory"))):
            return r
    return None


def growth(rows: list[dict]) -> dict:
    """MiB per chain step of each (peft, frames, method): the slope between its shortest and longest measured T."""
    out: dict = {}
    for key in dict.fromkeys((r["peft"], r["frames"], r["method"]) for r in rows):
        pts = sorted((r["T"], r["peak_mib"]) for r in rows if (r["peft"], r["frames"], r["method"]) == key
                     and "peak_mib" in r)
        if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
            out.setdefault(key[0], {}).setdefault(str(key[1]), {})[key[2]] = (
                (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]))
    return out


def _report(r: dict) -> None:
    C.log(C.memory_row(f"{r['peft']:4s} F={r['frames']:<3d}", r))


def print_memory(result: dict) -> None:
    mem = result["memory"]
    rows = mem["rows"]
    if not rows:
        return
    by = {_mkey(r): r for r in rows}
    Ts = sorted({r["T"] for r in rows})
    for peft, info in mem["models"].items():
        for F in sorted({r["frames"] for r in rows if r["peft"] == peft}):
            slopes = mem.get("growth", {}).get(peft, {}).get(str(F), {})
            table_rows = []
            for m in ["no-grad sampling", *METHODS]:
                if not any((peft, F, m, T) in by for T in Ts):
                    continue
                row = {"method": m, "slope": slopes.get(m)}
                for T in Ts:
                    r = by.get((peft, F, m, T), {})
                    row[f"m{T}"] = r["peak_mib"] if "peak_mib" in r else ("skip" if r.get("skipped") else None)
                    row[f"s{T}"] = r.get("seconds") if "peak_mib" in r else None
                    row[f"r{T}"] = r.get("time_ratio")
                table_rows.append(row)
            cols = ([("method", "method", "s")] + [(f"m{T}", f"T={T} MiB", ".0f") for T in Ts]
                    + [("slope", "MiB/step", ".2f")] + [(f"s{T}", f"T={T} s", ".2f") for T in Ts]
                    + [(f"r{T}", f"T={T} x", ".1f") for T in Ts])
            shape = info.get("latent_shapes", {}).get(str(F))
            print()
            print(C.table(table_rows, cols, title=(
                f"{info['model']} ({info['parameters'] / 1e6:.2f}M params), {peft} "
                f"({info['trainable_parameters']:,} trainable), {F} frames of {info['height']}x{info['width']} "
                f"(latents {shape}), n={result['config']['n']}: peak extra memory of one estimate (MiB), its slope "
                f"in T, seconds, and time / no-grad sampling (x)")))
    skipped = [r for r in rows if r.get("skipped")]
    for r in skipped:
        print(f"  skipped: {r['peft']} F={r['frames']} {r['method']} T={r['T']}: {r['skipped']}")


# -------------------------------------------------------------------------------------------------- align


def align_config(args, label: str, seed: int, out: Path, prompt_file: str | None):
    from chaintune.align import AlignConfig

    opts = dict(model=args.model, reward=args.reward, steps=args.align_steps, batch_size=args.batch,
                sample_steps=args.sample_steps, eval_every=args.eval_every, eval_samples=args.eval_samples,
                save_every=0, tensorboard=False, progress=False, report=False, seed=seed, out=str(out), device="cpu")
    if args.lr is not None:
        opts["lr"] = args.lr
    if prompt_file is not None:
        opts["prompt_file"] = prompt_file
    opts.update(ALIGN_METHODS[label])
    return AlignConfig.from_dict(opts)


def evals_of(metrics: list[dict], samples_per_step: int) -> list[dict]:
    """One point per evaluation: step, samples seen, the loop's clock, the clock without evaluations, eval/*."""
    has_steps = any("time" in m for m in metrics)
    clock = step_seconds(metrics)[1] if has_steps else [0.0]
    out = []
    for m in metrics:
        if "eval/reward" not in m:
            continue
        e = {"step": m["step"], "samples": m["step"] * samples_per_step, "seconds": m.get("time", 0.0),
             "train_seconds": clock[min(m["step"], len(clock) - 1)]}
        e.update({k: v for k, v in m.items() if k.startswith("eval/")})
        out.append(e)
    return out


def run_align(args, state: dict, save) -> None:
    import chaintune
    from chaintune.align import align, read_metrics
    from chaintune.options import flat_values

    runs = state["align"]["runs"]
    done = {(r["method"], r["seed"]) for r in runs if r.get("evals")}
    todo = [(m, s) for m in args.method_list for s in args.seed_list if (m, s) not in done]
    if not todo:
        return
    probe = chaintune.load(args.model)
    prompt_file = None if probe.default_prompts else FALLBACK_PROMPTS  # the model ships prompts: align uses them
    state["align"]["prompt_source"] = default_prompts(probe)
    del probe
    with tempfile.TemporaryDirectory(prefix="chaintune-video-bench-") as tmp:
        root = Path(args.runs) if args.runs else Path(tmp)
        for label, seed in todo:
            cfg = align_config(args, label, seed, root / f"{label.replace(' ', '_').replace('=', '')}-s{seed}",
                               prompt_file)
            C.log(f"align {label} seed {seed}: {args.align_steps} steps x batch {args.batch}, T={args.sample_steps}")
            t0 = time.time()
            try:
                run_dir = align(cfg, overwrite=True)
            except Exception as e:  # noqa: BLE001 - a failed run is recorded, the benchmark goes on
                runs.append({"method": label, "seed": seed, "error": f"{type(e).__name__}: {e}"[:500],
                             "wall_seconds": time.time() - t0})
                C.log(f"  FAILED: {runs[-1]['error']}")
                save()
                continue
            wall = time.time() - t0
            metrics = read_metrics(run_dir)
            v = flat_values(cfg)
            evals = evals_of(metrics, v["batch_size"] * v["grad_accum"])
            steps = [m for m in metrics if "time" in m]
            events = [{k: x for k, x in m.items() if "hack" in k or "rollback" in k or k == "step"}
                      for m in metrics if any("hack" in k or "rollback" in k for k in m)]
            run = {"method": label, "seed": seed, "evals": evals, "wall_seconds": wall,
                   "sec_per_step": step_seconds(metrics)[0] if steps else None,
                   "train": [{"step": m["step"], "reward_mean": m.get("reward_mean"), "grad_norm": m.get("grad_norm")}
                             for m in steps],
                   "zero_grad_steps": sum(1 for m in steps if m.get("grad_norm") == 0.0),
                   "guard_events": events[-5:],
                   "config": {k: v[k] for k in ("estimator", "h", "zo", "spans", "k", "lr", "lr_schedule", "kl_weight",
                                                "batch_size", "sample_steps", "steps", "eval_samples", "peft")}}
            if args.runs:
                run["run_dir"] = str(run_dir)
            runs.append(run)
            first, last = evals[0], evals[-1]
            f0, f1 = first.get("eval/follows_prompt", float("nan")), last.get("eval/follows_prompt", float("nan"))
            C.log(f"  reward {first['eval/reward']:+.3f} -> {last['eval/reward']:+.3f}  follows {f0:.0%} -> {f1:.0%}"
                  f"  {wall:.0f}s")
            save()


def print_align(result: dict) -> None:
    runs = result["align"]["runs"]
    if not runs:
        return
    rows = []
    for r in runs:
        if not r.get("evals"):
            rows.append({"method": r["method"], "seed": r["seed"], "err": r.get("error", "no evaluations")[:60]})
            continue
        f, last = r["evals"][0], r["evals"][-1]
        row = {"method": r["method"], "seed": r["seed"], "samples": last["samples"], "sps": r.get("sec_per_step"),
               "wall": r["wall_seconds"]}
        for k, short in (("eval/reward", "r"), ("eval/heldout_reward", "h"), ("eval/identity", "id"),
                         ("eval/direction", "dir"), ("eval/follows_prompt", "fol"), ("eval/nn_distance", "nn")):
            row[f"{short}0"], row[f"{short}1"] = f.get(k), last.get(k)
        rows.append(row)
    cols = [("method", "method", "s"), ("seed", "seed", "d"), ("r0", "reward@0", ".3f"), ("r1", "reward@end", ".3f"),
            ("h0", "heldout@0", ".3f"), ("h1", "heldout@end", ".3f"), ("id0", "ident@0", ".0%"),
            ("id1", "ident@end", ".0%"), ("dir0", "dir@0", ".0%"), ("dir1", "dir@end", ".0%"),
            ("fol0", "follows@0", ".0%"), ("fol1", "follows@end", ".0%"), ("nn0", "nn@0", ".3f"),
            ("nn1", "nn@end", ".3f"), ("samples", "samples", "d"), ("sps", "s/step", ".2f"), ("wall", "wall s", ".0f")]
    if any("err" in r for r in rows):
        cols.append(("err", "error", "s"))
    c = result["config"]
    print()
    print(C.table(rows, cols, title=(
        f"alignment of {c['model']} to {c['reward']}: {c['align_steps']} steps x batch {c['batch']}, "
        f"T={c['sample_steps']}, eval on {c['eval_samples']} clips (held-out: the reward's twin; "
        f"identity/direction/follows: the video judge; nn: distance to real digits)")))


# --------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    C.setup_threads(1)
    t_start = time.time()
    out = C.out_dir(args)
    path = out / "video.json"
    old = json.loads(path.read_text()) if args.resume and path.exists() else {}
    if old and old.get("config", {}).get("model") != args.model:
        C.log(f"--resume: {path} is of model {old.get('config', {}).get('model')!r}, not {args.model!r}; starting anew")
        old = {}
    state = {"memory": {"rows": list(old.get("memory", {}).get("rows", [])),
                        "models": dict(old.get("memory", {}).get("models", {})),
                        "growth": old.get("memory", {}).get("growth", {})},
             "align": {"runs": [r for r in old.get("align", {}).get("runs", []) if r.get("evals")],
                       "prompt_source": old.get("align", {}).get("prompt_source")}}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("out", "resume") and not k.endswith("_list")}

    def save() -> dict:
        result = {"config": config, "machine": C.machine(), **state,
                  "method": {"memory": "one chaintune.estimate_gradient per row via chaintune.plan.memory."
                                       "measure_peak: forked child, peak RSS above the loaded model (CPU) or allocator "
                                       "peak (CUDA); time_ratio = estimate seconds / no-grad sampling seconds at the "
                                       "same frames and T; estimators from benchmarks/scale.py METHODS",
                             "align": "chaintune.align.align per method and seed; evals from metrics.jsonl; "
                                      "seconds = training-loop clock (evaluations included), train_seconds = "
                                      "evaluations excluded (benchmarks/alignment.step_seconds)"},
                  "seconds": round(time.time() - t_start + old.get("seconds", 0), 1)}
        C.write_json(path, result)
        return result

    if "memory" in args.part_list:
        run_memory(args, state, save)
    if "align" in args.part_list:
        run_align(args, state, save)
    result = save()
    print_memory(result)
    print_align(result)
    plot(result, out / "video.png")
    print(f"\ntotal {result['seconds']:.0f}s; wrote {path} and {out / 'video.png'}")
    return result


def plot(result: dict, path: Path) -> None:
    plt = C.pyplot()
    rows = result["memory"]["rows"]
    runs = [r for r in result["align"]["runs"] if r.get("evals")]
    frames = sorted({r["frames"] for r in rows})
    panels = [("samples", "eval/reward", "reward vs samples"), ("train_seconds", "eval/reward", "reward vs wall-clock"),
              ("samples", "eval/heldout_reward", "held-out reward vs samples"),
              ("train_seconds", "eval/heldout_reward", "held-out reward vs wall-clock"),
              ("samples", "eval/follows_prompt", "judge: follows prompt vs samples"),
              ("train_seconds", "eval/follows_prompt", "judge: follows prompt vs wall-clock")]
    n_rows = int(bool(frames)) + int(bool(runs))
    if not n_rows:
        return
    n_cols = max(len(frames), len(panels) if runs else 0)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 4.0 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if frames:
        colors = dict(zip(["no-grad sampling", *METHODS], cycle, strict=False))
        for ax, F in zip(axes[0], frames, strict=False):
            ax.set_visible(True)
            for peft, style in (("lora", "o-"), ("full", "s--")):
                for m in colors:
                    pts = sorted((r["T"], max(r["peak_mib"], 1.0)) for r in rows if r["frames"] == F
                                 and r["peft"] == peft and r["method"] == m and "peak_mib" in r)
                    if pts:
                        T, mib = zip(*pts, strict=True)
                        ax.plot(T, mib, style, color=colors[m], label=f"{m} ({peft})", alpha=0.9,
                                lw=1 if m == "no-grad sampling" else 1.6)
            ax.set(xlabel="chain length T", ylabel="peak extra memory of one estimate (MiB)",
                   title=f"{F} frames: memory vs T", yscale="log")
            ax.legend(fontsize=6, ncol=2, loc="center right")
    if runs:
        methods = list(dict.fromkeys(r["method"] for r in runs))
        colors = dict(zip(methods, cycle, strict=False))
        for ax, (x, y, title) in zip(axes[-1], panels, strict=False):
            ax.set_visible(True)
            for r in runs:
                pts = [(e[x], e[y]) for e in r["evals"] if e.get(y) is not None and not math.isnan(e[y])]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    first = r is next(q for q in runs if q["method"] == r["method"])
                    ax.plot(xs, ys, "o-", ms=3, color=colors[r["method"]], alpha=0.8,
                            label=r["method"] if first else None)
            ax.set(xlabel="samples seen" if x == "samples" else "training seconds (evaluations excluded)",
                   ylabel=y, title=title)
        axes[-1][0].legend(fontsize=7)
    parts = ([f"memory of one gradient estimate (n={result['config']['n']})"] if frames else []) + (
        [f"alignment to {result['config']['reward']}"] if runs else [])
    fig.suptitle(f"{result['config']['model']}: {' and '.join(parts)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
