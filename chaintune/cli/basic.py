"""``chaintune sample`` (``chaintune pretrain`` is generated from its config in ``chaintune.cli.pretrain``)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from chaintune.options import INT64


def register(app: typer.Typer) -> None:
    @app.command()
    def sample(
        model: Annotated[str, typer.Option(help="Model id: builtin:NAME, a diffusers dir, a run dir or a hub id.")]
        = "builtin:digits",
        num: Annotated[int, typer.Option("--num", "-n", help="Number of images.")] = 64,
        out: Annotated[Path, typer.Option(help="Output directory (one PNG per sample + grid.png).")]
        = Path("out/samples"),
        steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
        eta: Annotated[float, typer.Option(help="DDIM eta (0 = deterministic, 1 = DDPM-like noise).")] = 1.0,
        scheduler: Annotated[str, typer.Option(help="ddim or ddpm.")] = "ddim",
        seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=INT64[1])] = 0,
        label: Annotated[int | None, typer.Option(help="Class label (class-conditional models).")] = None,
        prompt: Annotated[str | None, typer.Option(help="Prompt (text-conditional models).")] = None,
        guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
        batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 64,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: best available).")]
        = None,
        allow_pickle: Annotated[bool, typer.Option(help="Allow pickled (.bin/.pt) weights; only for files you trust.")]
        = False,
        overwrite: Annotated[bool, typer.Option(
            help="Replace existing sample PNGs and grid.png in --out (other files there are kept).")] = False,
        video_shape: Annotated[str | None, typer.Option(
            help="Video models: sample FRAMESxHEIGHTxWIDTH pixels (default: the size the model was saved at).")]
        = None,
        controlnet: Annotated[str | None, typer.Option(
            help="A `chaintune controlnet` run or an `align --controlnet` run of one (or its model/, or a bare "
            "ControlNetModel dir over --model) that steers the samples; needs --condition.")] = None,
        condition: Annotated[Path | None, typer.Option(
            help="With --controlnet: an image (grey, RGB, RGBA or 16-bit) whose edges/silhouette, the kind the "
            "ControlNet was trained on, every sample follows.")] = None,
    ):
        """Sample images from a model and write PNGs plus a grid."""
        import torch

        import chaintune
        from chaintune.sampling import check_conditions, check_sample_memory
        from chaintune.utils.devices import best_device, check_device
        from chaintune.utils.images import save_grid, save_images
        from chaintune.utils.io import check_output_dir
        from chaintune.utils.threads import apply_thread_policy, threads_from_env

        _check_sample_options(num=num, steps=steps, eta=eta, scheduler=scheduler, batch_size=batch_size,
                              guidance_scale=guidance_scale)
        threads_from_env()  # a bad CHAINTUNE_THREADS fails here, not after the model has loaded
        check_output_dir(out)  # before the model loads: cheap errors first
        dev = check_device(device) or best_device()
        with _locked_out(out):
            _check_sample_outputs(out, num, overwrite)  # under the lock: no other sampler writes them meanwhile
            if controlnet is not None or condition is not None:
                from chaintune.controlnet.sample import sample_command

                sample_command(controlnet, condition, model=model, num=num, out=out, steps=steps, eta=eta,
                               scheduler=scheduler, seed=seed, label=label, prompt=prompt,
                               guidance_scale=guidance_scale, batch_size=batch_size, device=dev,
                               allow_pickle=allow_pickle)
                return
            m = chaintune.load(model, device=dev, allow_pickle=allow_pickle, video_shape=video_shape)
            apply_thread_policy(m)  # 1 thread for small models, the free cores for big ones (benchmarks/threads.py)
            check_conditions(m, label=label, prompt=prompt, steps=steps)
            check_sample_memory(m, num, steps)
            prompts = prompt if prompt is not None else _default_prompts(m, num)
            t0 = time.time()
            traj = chaintune.sample(m, num, steps=steps, eta=eta, generator=torch.Generator().manual_seed(seed),
                                    labels=label, prompts=prompts, guidance_scale=guidance_scale,
                                    scheduler=scheduler, batch_size=batch_size)
            dt = time.time() - t0
            save_images(traj.images, out)  # one atomic write per file: never a half-written PNG
            grid = save_grid(traj.images, out / "grid.png")
        typer.echo(f"wrote {num} samples to {out}/ and {grid} ({dt:.1f}s, {steps} steps)")


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


def _check_sample_options(*, num: int, steps: int, eta: float, scheduler: str, batch_size: int,
                          guidance_scale: float | None = None) -> None:
    """Reject bad numbers before loading anything (one ``error:`` line, not an error deep in the sampler)."""
    from chaintune.errors import ChaintuneError, unknown_name

    for name, value in (("--num", num), ("--steps", steps), ("--batch-size", batch_size)):
        if value < 1:
            raise ChaintuneError(f"{name} must be >= 1, got {value}")
    if not (math.isfinite(eta) and eta >= 0):  # `nan < 0` is False: test the good range, not the bad one
        raise ChaintuneError(f"--eta must be a finite number >= 0, got {eta}")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ChaintuneError(f"--guidance-scale must be a finite number, got {guidance_scale}")
    if scheduler not in ("ddim", "ddpm"):
        raise unknown_name("scheduler", scheduler, ["ddim", "ddpm"])


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
