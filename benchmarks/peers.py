"""chaintune against the peer tools and against the machine's floor, on one model and one setting (issue 25).

One tiny random Stable Diffusion pipeline is built and saved (UNet 32/64 channels with cross-attention, 32x32x4
latents, a small CLIP text encoder and VAE; LoRA r=4 on the attention projections; 8 prompts; 20 DDIM steps,
eta 1, CFG 5; a differentiable brightness reward; fp32; one thread per process). Each operation then runs in a
fresh process (load, one warm-up, one timed call), so peak memory is the process's and every side pays the same
loading; the repeats are interleaved, so a drifting load hits every side alike:

* ``sample``: 8 samples with their log-probs (chaintune's rollout; TRL's ``DDPOTrainer._generate_samples``);
* ``ddpo``: one DDPO iteration, sampling 8 + a PPO pass over the 20 steps + AdamW (``DDPOTrainer.step``);
* ``alignprop``: one AlignProp step, backprop through the last step + AdamW (``AlignPropTrainer.step`` with
  ``truncated_backprop_timestep`` = 19);
* ``ddpo-reuse``: the DDPO iteration with ``reuse_rollout="graph"`` (the first PPO epoch's log-probs from the
  rollout's graph of every step, one forward pass per step fewer; compared with TRL's ``ddpo``);
* ``ddpo-per-sample``: the DDPO iteration with ``reuse_rollout="per-sample"`` (each step backpropagated while
  sampling into per-sample LoRA gradients: one forward pass per step fewer at one step's memory);
* ``rlr``: one RLR step at align's defaults (chaintune only);
* ``floor``: the diffusers pipeline's own inference of the same 8 prompts (the floor any sampler is held to).

The peer is TRL 0.11 (its last release with DDPO and AlignProp), which needs transformers < 4.47: install it in
its own environment and name its interpreter with ``--peer-python`` (``python -m venv --system-site-packages ENV &&
ENV/bin/pip install trl==0.11.4 "transformers<4.47" "datasets<3.2"``). Without it, chaintune's side and the floor
run, and the table says so. Prints a table (min / median seconds, CPU seconds, peak RSS) with ratios, and writes
``benchmarks/results/peers.json`` and ``peers.png``.

    python benchmarks/peers.py --repeats 3 --peer-python /work/peer-venv/bin/python
    python benchmarks/peers.py --quick      # CI smoke: one repeat of chaintune's sampling and the floor, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["a red cat", "a blue dog", "a green car", "a tall tree", "a small boat", "an old house", "a fast bird",
           "a round stone"]
ETA, CFG, BATCH, RANK = 1.0, 5.0, 8, 4
STEPS = int(os.environ.get("PEERS_STEPS", "20"))  # --quick: 2 (a smoke run; the workers read it from here)
OPS = ("sample", "ddpo", "ddpo-reuse", "ddpo-per-sample", "alignprop", "rlr", "floor")
PEER_OPS = ("sample", "ddpo", "alignprop")
# chaintune-only variants, compared with the peer's row of the same operation
PEER_ROW = {"ddpo-reuse": "ddpo", "ddpo-per-sample": "ddpo"}


def build_pipeline(path: Path, seed: int = 0) -> None:
    """The tiny random SD pipeline every side loads (saved once, safetensors)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from chaintune.testing import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(max_length=16)
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32),
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    # the slow tokenizer's files too: transformers 5 saves tokenizer.json only, which the peer's transformers 4
    # CLIPTokenizer cannot read (the vocabulary is the tiny tokenizer's: bytes, no merges)
    vocab = tok.get_vocab()
    (path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")


def brightness(images, prompts=None, labels=None):
    """Differentiable: the images' mean value."""
    return images.float().flatten(1).mean(1)


brightness.differentiable = True


# ------------------------------------------------------------------------------------------ one op, one process


def _chaintune_op(op: str, path: str):
    """A closure running ``op`` once with chaintune (model loaded and LoRA applied here, outside the timing)."""
    import torch

    import chaintune
    from chaintune.adapters import apply_lora
    from chaintune.chain import StepGrad
    from chaintune.estimators import get_estimator
    from chaintune.estimators.base import EstimationContext, draw_noise, rollout
    from chaintune.sampling import make_conditions

    model = chaintune.load(path)
    gen = torch.Generator().manual_seed(0)
    if op == "floor":
        pipe = model.pipe

        def floor():
            with torch.no_grad():
                pipe(PROMPTS, num_inference_steps=STEPS, eta=ETA, guidance_scale=CFG, output_type="pt",
                     generator=torch.Generator().manual_seed(0))
        return floor
    apply_lora(model.denoiser, rank=RANK)
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def ctx():
        cond = make_conditions(model, BATCH, prompts=PROMPTS, guidance_scale=CFG, generator=gen)
        return EstimationContext(model=model, reward=brightness, n=BATCH, steps=STEPS, eta=ETA, generator=gen,
                                 conditions=cond, checkpoint=False, baseline="batch")

    if op == "sample":
        def sample():
            c = ctx()
            x_T, noises = draw_noise(c, BATCH)
            with torch.no_grad():
                rollout(c, StepGrad.NONE, x_T=x_T, noises=noises, cond=c.conditions)
        return sample
    reuse = {"ddpo-reuse": "graph", "ddpo-per-sample": "per-sample"}
    est = get_estimator("reinforce" if op.startswith("ddpo") else {"alignprop": "truncated-backprop", "rlr": "rlr"}[op],
                        **({"reuse_rollout": reuse[op]} if op in reuse else {}))

    def step():
        opt.zero_grad(set_to_none=True)
        for _ in est.updates(ctx()):
            opt.step()
    return step


def _trl_op(op: str, path: str):
    """A closure running ``op`` once with TRL 0.11 on the same saved pipeline and settings."""
    import tempfile

    import torch
    from trl import AlignPropConfig, AlignPropTrainer, DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    pipe = DefaultDDPOStableDiffusionPipeline(path, use_lora=True)
    it = iter(PROMPTS * 1000)

    def prompt_fn():
        return next(it), {}

    def reward_fn(images, prompts, metadata):
        return brightness(images), {}

    common = dict(num_epochs=1, sample_num_steps=STEPS, sample_eta=ETA, sample_guidance_scale=CFG,
                  train_batch_size=BATCH, train_gradient_accumulation_steps=1, mixed_precision="no",
                  log_with=None, allow_tf32=False, train_use_8bit_adam=False, train_learning_rate=1e-4,
                  project_kwargs={"logging_dir": tempfile.mkdtemp(), "project_dir": tempfile.mkdtemp()})
    if op == "alignprop":
        cfg = AlignPropConfig(**common, truncated_backprop_rand=False, truncated_backprop_timestep=STEPS - 1)
        trainer = AlignPropTrainer(cfg, reward_fn, prompt_fn, pipe)
        return lambda: trainer.step(0, 0)
    cfg = DDPOConfig(**common, sample_batch_size=BATCH, sample_num_batches_per_epoch=1, train_num_inner_epochs=1,
                     per_prompt_stat_tracking=False, train_timestep_fraction=1.0)
    trainer = DDPOTrainer(cfg, reward_fn, prompt_fn, pipe)
    if op == "sample":
        def sample():
            with torch.no_grad():
                trainer._generate_samples(iterations=1, batch_size=BATCH)
        return sample
    return lambda: trainer.step(0, 0)


def worker(side: str, op: str, path: str) -> dict:
    import torch

    torch.set_num_threads(1)
    fn = _trl_op(op, path) if side == "trl" else _chaintune_op(op, path)
    fn()  # warm-up: first-call allocations and lazy initialisation
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"side": side, "op": op, "wall": wall, "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
            "peak_mib": r1.ru_maxrss / 1024}


# ------------------------------------------------------------------------------------------ the comparison


def _run(python: str, side: str, op: str, path: Path) -> dict | None:
    env = {**os.environ, "PEERS_STEPS": str(STEPS), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([python, __file__, "--worker", side, op, str(path)], capture_output=True, text=True, env=env,
                       timeout=1800)
    if p.returncode != 0:
        print(f"  {side} {op} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def _stats(rows: list[dict], key: str) -> tuple[float, float]:
    vals = [r[key] for r in rows]
    return min(vals), statistics.median(vals)


def main(argv: list[str] | None = None) -> bool:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "OP", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer-python", default=None, help="interpreter of an environment with trl==0.11.4")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results; --quick: its tmp/)")
    p.add_argument("--quick", action="store_true", help="one repeat, chaintune's sample and the floor")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return True
    global STEPS
    if a.quick:
        STEPS = 2
    ops = ["sample", "floor"] if a.quick else a.ops.split(",")
    repeats = 1 if a.quick else a.repeats
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / ("tmp" if a.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    model = out / "peers_model"
    if not (model / "model_index.json").exists():
        build_pipeline(model)
    peer = a.peer_python
    if peer and subprocess.run([peer, "-c", "import trl; assert trl.__version__.startswith('0.11')"],
                               capture_output=True).returncode != 0:
        print(f"note: {peer} has no trl 0.11; the peer's side is skipped")
        peer = None
    jobs = [("chaintune", op) for op in ops] + ([("trl", op) for op in ops if op in PEER_OPS] if peer else [])
    rows: list[dict] = []
    for rep in range(repeats):
        for side, op in jobs:
            r = _run(peer if side == "trl" else sys.executable, side, op, model)
            if r is not None:
                rows.append({**r, "repeat": rep})
                print(f"  [{rep}] {side:9} {op:9} {r['wall']:7.2f} s  cpu {r['cpu']:7.2f} s  {r['peak_mib']:6.0f} MiB")
    table = []
    floor = [r for r in rows if r["op"] == "floor"]
    for op in ops:
        line = {"op": op}
        for side in ("chaintune", "trl"):
            got = [r for r in rows if r["side"] == side and r["op"] == (PEER_ROW.get(op, op) if side == "trl" else op)]
            if got:
                line[side] = {k: _stats(got, k) for k in ("wall", "cpu", "peak_mib")}
        if "chaintune" in line and "trl" in line:
            line["ratio_wall_median"] = line["chaintune"]["wall"][1] / line["trl"]["wall"][1]
            line["ratio_peak"] = line["chaintune"]["peak_mib"][1] / line["trl"]["peak_mib"][1]
        if "chaintune" in line and floor and op != "floor":
            line["over_floor_median"] = line["chaintune"]["wall"][1] / statistics.median(r["wall"] for r in floor)
        table.append(line)
    print(f"\npeers: tiny SD (32/64 ch, 32x32x4 latents), LoRA r={RANK}, {BATCH} prompts, {STEPS} DDIM steps, eta "
          f"{ETA}, CFG {CFG}, fp32, 1 thread; {repeats} interleaved repeats" + ("" if peer else "; no TRL 0.11: "
                                                                                   "chaintune's side only"))
    print(f"{'operation':10} {'chaintune s (min/med)':>22} {'TRL s (min/med)':>17} {'ct/TRL':>7} "
          f"{'peak MiB ct/TRL':>16} {'ct/floor':>9}")
    for t in table:
        ct, tr = t.get("chaintune"), t.get("trl")
        fmt = (lambda s: f"{s['wall'][0]:.2f} / {s['wall'][1]:.2f}")
        print(f"{t['op']:10} {fmt(ct) if ct else '-':>22} {fmt(tr) if tr else '-':>17} "
              f"{t.get('ratio_wall_median', float('nan')):7.2f} "
              f"{(ct['peak_mib'][1] if ct else float('nan')):7.0f}/{(tr['peak_mib'][1] if tr else float('nan')):<7.0f} "
              f"{t.get('over_floor_median', float('nan')):9.2f}")
    result = {"settings": {"steps": STEPS, "eta": ETA, "cfg": CFG, "batch": BATCH, "lora_rank": RANK,
                           "repeats": repeats, "peer": "trl 0.11" if peer else None}, "rows": rows, "table": table}
    name = "peers"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    _plot(table, out / f"{name}.png")
    return True


def _plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [t["op"] for t in table]
    fig, ax = plt.subplots(figsize=(6, 3))
    for k, side in enumerate(("chaintune", "trl")):
        vals = [t[side]["wall"][1] if side in t else 0 for t in table]
        ax.bar([i + 0.4 * k for i in range(len(ops))], vals, width=0.4, label=side)
    ax.set_xticks([i + 0.2 for i in range(len(ops))], ops)
    ax.set_ylabel("seconds (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
