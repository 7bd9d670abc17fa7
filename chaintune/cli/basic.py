"""``chaintune sample``, generated from :class:`SampleConfig` like the trainers' commands (no ``--resume``: it writes
no run)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import typer

from chaintune.cli.options import config_command
from chaintune.options import INT64, check, option


@dataclass
class SampleConfig:
    """Every option of ``chaintune sample`` (flags and ``--config`` keys share these names)."""

    model: str = option("builtin:digits", "Model id: builtin:NAME, a diffusers dir, a run dir or a hub id.")
    num: int = option(64, "Number of images.", min=1, flags=("-n",))
    out: str = option("out/samples", "Output directory (one PNG per sample + grid.png).")
    steps: int = option(50, "Denoising steps.", min=1)
    eta: float = option(1.0, "DDIM eta (0 = deterministic, 1 = DDPM-like noise).", min=0)
    scheduler: str = option("ddim", "ddim or ddpm.", choices=("ddim", "ddpm"))
    seed: int = option(0, "Random seed.", min=0, max=INT64[1])
    label: int | None = option(None, "Class label (class-conditional models).")
    prompt: str | None = option(None, "Prompt (text-conditional models).")
    guidance_scale: float | None = option(None, "Classifier-free guidance scale.")
    batch_size: int = option(64, "Samples per forward pass.", min=1)
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: best available).")
    allow_pickle: bool = option(False, "Allow pickled (.bin/.pt) weights; only for files you trust.")
    video_shape: str | None = option(None, "Video models: sample FRAMESxHEIGHTxWIDTH pixels (default: the size the "
                                     "model was saved at).")
    controlnet: str | None = option(None, "A `chaintune controlnet` run or an `align --controlnet` run of one (or its "
                                    "model/, or a bare ControlNetModel dir over --model) that steers the samples; "
                                    "needs --condition.")
    condition: str | None = option(None, "With --controlnet: an image (grey, RGB, RGBA or 16-bit) whose "
                                   "edges/silhouette, the kind the ControlNet was trained on, every sample follows.")


def _sample(cfg: SampleConfig, *, resume: bool, overwrite: bool) -> None:
    """Sample images from a model and write PNGs plus a grid."""
    import torch

    import chaintune
    from chaintune.sampling import check_conditions, check_sample_memory
    from chaintune.utils.devices import best_device, check_device
    from chaintune.utils.images import save_grid, save_images
    from chaintune.utils.io import check_output_dir
    from chaintune.utils.threads import apply_thread_policy, threads_from_env

    check(cfg)  # (the CLI checked the values first: _check_sample_options)
    out = Path(cfg.out)
    threads_from_env()  # a bad CHAINTUNE_THREADS fails here, not after the model has loaded
    check_output_dir(out)  # before the model loads: cheap errors first
    dev = check_device(cfg.device) or best_device()
    with _locked_out(out):
        _check_sample_outputs(out, cfg.num, overwrite)  # under the lock: no other sampler writes them meanwhile
        if cfg.controlnet is not None or cfg.condition is not None:
            from chaintune.controlnet.sample import sample_command

            sample_command(cfg.controlnet, None if cfg.condition is None else Path(cfg.condition), model=cfg.model,
                           num=cfg.num, out=out, steps=cfg.steps, eta=cfg.eta, scheduler=cfg.scheduler,
                           seed=cfg.seed, label=cfg.label, prompt=cfg.prompt, guidance_scale=cfg.guidance_scale,
                           batch_size=cfg.batch_size, device=dev, allow_pickle=cfg.allow_pickle)
            return
        m = chaintune.load(cfg.model, device=dev, allow_pickle=cfg.allow_pickle, video_shape=cfg.video_shape)
        apply_thread_policy(m)  # 1 thread for small models, the free cores for big ones (benchmarks/threads.py)
        check_conditions(m, label=cfg.label, prompt=cfg.prompt, steps=cfg.steps)
        check_sample_memory(m, cfg.num, cfg.steps)
        prompts = cfg.prompt if cfg.prompt is not None else _default_prompts(m, cfg.num)
        t0 = time.time()
        traj = chaintune.sample(m, cfg.num, steps=cfg.steps, eta=cfg.eta,
                                generator=torch.Generator().manual_seed(cfg.seed), labels=cfg.label, prompts=prompts,
                                guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler, batch_size=cfg.batch_size)
        dt = time.time() - t0
        save_images(traj.images, out)  # one atomic write per file: never a half-written PNG
        grid = save_grid(traj.images, out / "grid.png")
    typer.echo(f"wrote {cfg.num} samples to {out}/ and {grid} ({dt:.1f}s, {cfg.steps} steps)")


def register(app: typer.Typer) -> None:
    config_command(app, "sample", SampleConfig, _sample, resumable=False, precheck=_check_sample_options,
                   help="Sample images from a model and write PNGs plus a grid.",
                   overwrite_help="Replace existing sample PNGs and grid.png in --out (other files there are kept).")


def _default_prompts(m, num: int) -> list[str] | None:
    """Without --prompt, a prompt model samples the prompts it ships (``default_prompts``, as align trains on),
    in order and repeated; the empty prompt only when it ships none."""
    source = getattr(m, "default_prompts", None)
    if not m.takes_prompts or not source:
        return None
    from chaintune.prompts import load_prompts

    pool = load_prompts(source).prompts
    typer.echo(f"prompts: the model's default prompts ({source}, {len(pool)}); choose one with --prompt")
    return [pool[i % len(pool)] for i in range(num)]


def _check_sample_options(v: dict) -> None:
    """Reject bad numbers before loading anything, with the flag's name (one ``error:`` line, not an error deep in
    the sampler); the generic option checks follow."""
    from chaintune.errors import ChaintuneError, unknown_name

    def number(name: str) -> float | None:
        try:
            return None if v[name] is None else float(v[name])
        except (TypeError, ValueError):
            return None  # not a number at all: the option's own check says so

    for name in ("num", "steps", "batch_size"):
        n = number(name)
        if n is not None and n < 1:
            raise ChaintuneError(f"--{name.replace('_', '-')} must be >= 1, got {v[name]}")
    eta, scale, seed = number("eta"), number("guidance_scale"), number("seed")
    if eta is not None and not (math.isfinite(eta) and eta >= 0):  # `nan < 0` is False: test the good range
        raise ChaintuneError(f"--eta must be a finite number >= 0, got {v['eta']}")
    if scale is not None and not math.isfinite(scale):
        raise ChaintuneError(f"--guidance-scale must be a finite number, got {v['guidance_scale']}")
    if v["scheduler"] not in ("ddim", "ddpm"):
        raise unknown_name("scheduler", v["scheduler"], ["ddim", "ddpm"])
    if seed is not None and not 0 <= int(v["seed"]) <= INT64[1]:
        raise ChaintuneError(f"--seed must be in [0, {INT64[1]}], got {v['seed']}")


_OUTPUT = re.compile(r"sample_(\d{4,})\.(png|gif)|grid\.(png|gif)")


def existing_outputs(out: Path, num: int) -> list[Path]:
    """The files of ``out`` that ``chaintune sample --num num`` writes (``sample_0000.png`` ... as ``save_images``
    names them, GIFs for videos, and the grid), found by listing ``out``: never a list of every name it could
    write, which for a huge ``--num`` would not fit in memory."""
    if not out.is_dir():
        return []
    found = []
    for name in os.listdir(out):
        m = _OUTPUT.fullmatch(name)
        index = m and m.group(1)
        if m and (index is None or (int(index) < num and index == f"{int(index):04d}")):
            found.append(out / name)
    return sorted(found)


def _check_sample_outputs(out: Path, num: int, overwrite: bool) -> None:
    """Existing samples of the same names are someone's results: replaced only with --overwrite."""
    from chaintune.utils.io import check_overwrite

    check_overwrite(existing_outputs(out, num), overwrite)


@contextlib.contextmanager
def _locked_out(out: Path) -> Iterator[None]:
    """Hold ``out`` for the command, locked as the trainers lock a run (:class:`~chaintune.run.rundir.RunLock`,
    an ``flock`` on the folder), so that two samplers into one folder never interleave their files. The folders
    created for it are removed again when the command fails before writing into them."""
    from chaintune.errors import ChaintuneError
    from chaintune.run.rundir import RunLock
    from chaintune.utils.io import lock_holder

    made = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    try:
        try:
            lock.acquire()
        except ChaintuneError:
            who = lock_holder(out)
            if not who:
                raise
            raise ChaintuneError(f"{out} is being written by another chaintune process ({who}); wait for it or "
                                 "choose another --out") from None
        yield
    except BaseException:
        for p in made:  # deepest first; stops at the first folder that is not empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    finally:
        lock.release()
