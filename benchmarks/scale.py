"""Memory and time of one gradient estimate on the *real* denoisers: SD-1.5, SDXL, FLUX.1, Wan 2.1 1.3B, DiT-XL/2.

Each family's denoiser is built at its published configuration (``FAMILIES`` below names the config file
each one copies) with random weights, no download. Memory is the denoiser's business, so the rest of the
pipeline is stood in for: the text encoders by fixed random embeddings of the published shapes (CLIP 77x768,
SDXL's 77x2048 + pooled 1280 + 6 micro-conditioning ids, FLUX's T5 sequence + CLIP pooled 768, Wan's UMT5
sequence x4096, DiT's class label), the VAE by a cheap decode (``sigmoid`` of the first three latent
channels; mean over frames for video) and the reward by the decoded images' mean brightness (differentiable,
so the first-order estimators backpropagate through it). :class:`StandIn` wraps denoiser + embeddings as a
``chaintune`` DiffusionModel, so ``chaintune.estimate_gradient`` runs unchanged: a DDIM chain (eta = 1) for
the epsilon models, the flow-matching SDE chain (FlowMatchEulerDiscreteScheduler, shift 3) for FLUX/Wan.

Per family, per trainable set (LoRA rank 4 on the attention projections, or all weights), per chain length T
and per estimator (full backprop with and without gradient checkpointing, AlignProp = truncated backprop
k = 1, DDPO = REINFORCE, RLR h = 1 and h = 2) one estimate of n samples runs through
:func:`chaintune.plan.memory.measure_peak` (the probe ``chaintune plan`` uses): on CPU a forked child
reports its peak RSS above the loaded model, on CUDA the allocator's peak. The time ratio is the estimate's
time over a no-grad sampling of the same T steps. A configuration past ``--timeout`` seconds or
``--max-gib`` of extra memory is killed and recorded as skipped, with the reason.

On CPU (the default) everything runs in bfloat16 at a small latent size and one thread, batch n = 2 (RLR's
zeroth-order steps pair samples); FLUX's 12B transformer does not fit in 16 GiB even in bf16 (24 GB), so on
CPU it runs the published width at a *reduced depth* (labelled in the table). ``--device cuda`` runs every
family at full depth and its native resolution.

    python benchmarks/scale.py --families sd15,wan          # this CPU (tens of minutes); --resume adds to it
    python benchmarks/scale.py --device cuda                # native resolution, every family
    python benchmarks/scale.py --quick                      # toy widths, T = 3, 5, LoRA (CI smoke, < 60 s)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]

import torch

from chaintune.backends.base import Conditions, DiffusionModel

# label: (estimator, options, gradient checkpointing). RLR needs checkpoint=True (see benchmarks/memory.py).
METHODS: dict[str, tuple[str, dict, bool]] = {
    "full-backprop": ("full-backprop", {}, False),
    "full-backprop+ckpt": ("full-backprop", {}, True),
    "alignprop k=1": ("truncated-backprop", {"k": 1}, True),
    "ddpo": ("reinforce", {}, True),
    "rlr h=1": ("rlr", {"h": 1, "zo": True, "spans": 1}, True),  # eq. 6, as measured
    "rlr h=2": ("rlr", {"h": 2, "zo": True, "spans": 1}, True),  # eq. 6, as measured
}

_SD_SCHED = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}

# Published denoiser configurations (the config.json of each model's denoiser folder on the Hugging Face hub).
# cond: shapes of the stand-in conditioning; latent: (channels, native latent size) -> CPU latent size;
# cpu_overrides: what the CPU run changes in the config (labelled in results); quick: toy overrides for CI.
FAMILIES: dict[str, dict] = {
    "sd15": {
        "name": "SD-1.5 UNet",
        "source": "stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json",
        "class": "UNet2DConditionModel",
        "config": {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                   "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
                   "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "norm_num_groups": 32},
        "cond": {"text": (77, 768)}, "latent": (4, 64), "cpu_latent": 16, "scheduler": "ddim",
        "quick": {"block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
                  "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "attention_head_dim": 8},
        "quick_cond": {"text": (8, 32)},
    },
    "sdxl": {
        "name": "SDXL UNet",
        "source": "stabilityai/stable-diffusion-xl-base-1.0, unet/config.json",
        "class": "UNet2DConditionModel",
        "config": {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                   "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048,
                   "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10),
                   "use_linear_projection": True,
                   "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                   "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32},
        "cond": {"text": (77, 2048), "pooled": 1280, "time_ids": 6}, "latent": (4, 128), "cpu_latent": 16,
        "scheduler": "ddim",
        "quick": {"block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
                  "attention_head_dim": (4, 8), "transformer_layers_per_block": (1, 1),
                  "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                  "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "addition_time_embed_dim": 8,
                  "projection_class_embeddings_input_dim": 6 * 8 + 16},
        "quick_cond": {"text": (8, 32), "pooled": 16, "time_ids": 6},
    },
    "flux": {
        "name": "FLUX.1-dev transformer",
        "source": "black-forest-labs/FLUX.1-dev, transformer/config.json",
        "class": "FluxTransformer2DModel",
        "config": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                   "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)},
        "cond": {"text": (512, 4096), "pooled": 768}, "latent": (16, 128), "cpu_latent": 8, "scheduler": "flow",
        # 11.9B params = 22.2 GiB in bf16, no room on a 16-24 GiB CPU box: the published width (3072 = 24 heads
        # x 128) at 2 of 19 double-stream and 4 of 38 single-stream blocks, the published 1:2 ratio, so the
        # blocks' share scales to full depth by one factor (9.5)
        "cpu_overrides": {"num_layers": 2, "num_single_layers": 4},
        "depth_keys": {"num_layers": "double-stream", "num_single_layers": "single-stream"},
        "cpu_cond": {"text": (64, 4096), "pooled": 768},
        "quick": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
                  "joint_attention_dim": 16, "pooled_projection_dim": 8, "axes_dims_rope": (2, 2, 4),
                  "in_channels": 16},
        "quick_cond": {"text": (8, 16), "pooled": 8},
    },
    "wan": {
        "name": "Wan 2.1 T2V 1.3B transformer",
        "source": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json",
        "class": "WanTransformer3DModel",
        "config": {"patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
                   "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
                   "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024},
        # native: 81 frames of 480x832 -> latents [16, 21, 60, 104]; CPU: one latent frame of cpu_latent^2
        "cond": {"text": (512, 4096)}, "latent": (16, (21, 60, 104)), "cpu_latent": (1, 16, 16), "scheduler": "flow",
        "cpu_cond": {"text": (64, 4096)},
        "quick": {"num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
                  "text_dim": 16, "freq_dim": 32, "ffn_dim": 32, "num_layers": 1, "rope_max_seq_len": 32},
        "quick_cond": {"text": (8, 16)},
    },
    "dit": {
        "name": "DiT-XL/2 (256)",
        "source": "facebook/DiT-XL-2-256, transformer/config.json",
        "class": "DiTTransformer2DModel",
        "config": {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
                   "num_layers": 28, "sample_size": 32, "patch_size": 2, "norm_num_groups": 32,
                   "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate",
                   "attention_bias": True},
        "cond": {"label": 1000}, "latent": (4, 32), "cpu_latent": 16, "scheduler": "ddim-linear",
        "quick": {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1, "norm_num_groups": 4,
                  "num_embeds_ada_norm": 4},
        "quick_cond": {"label": 4},
    },
}


def _hw(size) -> tuple[int, ...]:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


class StandIn(DiffusionModel):
    """A real denoiser behind fixed random conditioning and a cheap decode: what the chain and the estimators
    see of a full pipeline, minus text encoders and VAE (which do not train and do not grow with T)."""

    def __init__(self, family: str, denoiser: torch.nn.Module, scheduler, latent_shape: tuple[int, ...],
                 call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], source: str):
        self.kind = family
        self.denoiser = denoiser
        self.scheduler = scheduler
        self._latent_shape = tuple(latent_shape)
        self._call = call
        self.source = source

    @property
    def latent_shape(self):
        return self._latent_shape

    def default_conditions(self, n, generator=None):
        return Conditions()

    def model_output(self, x, t, cond, encoded=None):
        return self._call(x, t)

    def denoise_fn(self, cond, encoded=None):
        return self._call

    def decode(self, latents):
        x = latents.float()
        if x.dim() == 5:  # video [n, C, f, h, w]: the frames' mean stands in for decoded frames
            x = x.mean(2)
        return torch.sigmoid(x[:, :3])


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def _scheduler(kind: str):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if kind == "ddim":
        return DDIMScheduler(**_SD_SCHED)
    if kind == "ddim-linear":
        return DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def build(family: str, mode: str, dtype: torch.dtype, latent=None, seed: int = 0) -> tuple[StandIn, dict]:
    """The family's denoiser at ``mode`` ('native', 'cpu' or 'quick') in ``dtype`` with random weights, wrapped.

    Returns the model and a description (config changes, latent shape, parameter count) for the results."""
    import diffusers

    spec = FAMILIES[family]
    cfg = dict(spec["config"])
    cond = dict(spec["cond"])
    changed: dict = {}
    if mode == "quick":
        changed = dict(spec["quick"])
        cond = dict(spec["quick_cond"])
    elif mode == "cpu":
        changed = dict(spec.get("cpu_overrides", {}))
        cond = dict(spec.get("cpu_cond", cond))
    cfg.update(changed)
    channels = cfg.get("in_channels", spec["latent"][0])
    if family == "flux":
        channels = cfg["in_channels"] // 4  # unpacked latents; 2x2 patches pack into in_channels
    size = latent or (spec["latent"][1] if mode == "native" else spec["cpu_latent"] if mode == "cpu" else 8)
    if family == "wan" and not isinstance(size, (tuple, list)):
        size = (1, size, size)
    if family == "dit":
        cfg["sample_size"] = _hw(size)[0]
    if family in ("sd15", "sdxl"):
        cfg["sample_size"] = _hw(size)[0]
    latent_shape = (channels, *_hw(size))
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: SDXL/FLUX in fp32 would double the peak
    try:
        net = getattr(diffusers, spec["class"])(**cfg)
    finally:
        torch.set_default_dtype(prev)
    net.to(dtype).eval()
    net.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(1, *shape, generator=g).to(dtype)

    call = _caller(family, net, cond, rnd, dtype)
    info = {"family": family, "name": spec["name"], "source": spec["source"], "mode": mode,
            "config_changes": {k: list(v) if isinstance(v, tuple) else v for k, v in changed.items()},
            "depth_reduced": bool(mode == "cpu" and spec.get("cpu_overrides")),
            "depth": _depth(spec, changed) if mode == "cpu" and spec.get("cpu_overrides") else None,
            "latent_shape": list(latent_shape), "conditioning": {k: list(v) if isinstance(v, tuple) else v
                                                                 for k, v in cond.items()},
            "parameters": sum(p.numel() for p in net.parameters()), "dtype": str(dtype).replace("torch.", "")}
    return StandIn(family, net, _scheduler(spec["scheduler"]), latent_shape, call, spec["source"]), info


def _depth(spec: dict, changed: dict) -> str:
    """'2 of 19 double-stream + 4 of 38 single-stream blocks': the blocks built against the published count."""
    return " + ".join(f"{changed[k]} of {spec['config'][k]} {name}" for k, name in spec.get("depth_keys", {}).items()
                      if k in changed) + " blocks"


def _caller(family: str, net, cond: dict, rnd, dtype) -> Callable:
    """(x_t, t) -> model output, called the way the family's chaintune backend calls its denoiser."""
    if family == "sd15":
        emb = rnd(*cond["text"])
        return lambda x, t: net(x, _tt(t, x), encoder_hidden_states=emb.expand(x.shape[0], -1, -1)).sample
    if family == "sdxl":
        emb, pooled = rnd(*cond["text"]), rnd(cond["pooled"])
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], dtype=dtype)[:, : cond["time_ids"]]

        def sdxl(x, t):
            n = x.shape[0]
            added = {"text_embeds": pooled.expand(n, -1), "time_ids": ids.expand(n, -1)}
            return net(x, _tt(t, x), encoder_hidden_states=emb.expand(n, -1, -1), added_cond_kwargs=added).sample

        return sdxl
    if family == "flux":
        from diffusers import FluxPipeline

        from chaintune.backends.flux import pack_latents, unpack_latents

        emb, pooled = rnd(*cond["text"]), rnd(cond["pooled"])
        txt_ids = torch.zeros(cond["text"][0], 3, dtype=dtype)

        def flux(x, t):
            n, _, h, w = x.shape
            img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, dtype)
            guidance = torch.full((n,), 3.5, dtype=torch.float32)
            out = net(hidden_states=pack_latents(x), timestep=_tt(t, x).to(dtype) / 1000, guidance=guidance,
                      pooled_projections=pooled.expand(n, -1), encoder_hidden_states=emb.expand(n, -1, -1),
                      txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            return unpack_latents(out, h, w)

        return flux
    if family == "wan":
        emb = rnd(*cond["text"])
        return lambda x, t: net(hidden_states=x, timestep=_tt(t, x).float(), encoder_hidden_states=emb.expand(
            x.shape[0], -1, -1), return_dict=False)[0]
    if family == "dit":
        label = torch.tensor([cond["label"] // 2])

        def dit(x, t):
            out = net(x, timestep=_tt(t, x), class_labels=label.expand(x.shape[0])).sample
            return out[:, : x.shape[1]]

        return dit
    raise KeyError(family)


def _tt(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


# ---------------------------------------------------------------------------------------------- measuring


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--families", default="sd15,wan", help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--steps", default="10,20,50", help="comma list of T")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of estimator labels")
    p.add_argument("--peft", default="lora,full", help="trainable sets: lora (rank 4), full (all weights)")
    p.add_argument("--device", default="cpu", help="cpu (bf16, small latents) or cuda (native resolution)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--latent", type=int, default=None, help="latent side (default: the family's CPU/native size)")
    p.add_argument("--n", type=int, default=2, help="samples per estimate (even: RLR's zeroth-order steps pair them)")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds before a configuration is skipped")
    p.add_argument("--max-gib", type=float, default=14.0, help="extra memory before a configuration is skipped")
    p.add_argument("--resume", action="store_true", help="keep the rows of the existing JSON and skip measured ones")
    p.add_argument("--retry-skipped", action="store_true", help="with --resume: measure skipped rows again")
    p.add_argument("--merge", type=Path, action="append", default=[],
                   help="add the rows of another scale.json (e.g. a run of other families); with --families '' "
                        "nothing is measured, the merged table and plot are written")
    a = p.parse_args(argv)
    if a.quick:
        a.timeout = 30.0
        if a.steps == p.get_default("steps"):
            a.steps = "3,5"
        if a.peft == p.get_default("peft"):
            a.peft = "lora"
    a.steps_list = [int(s) for s in a.steps.split(",") if s]
    a.family_list = [f for f in a.families.split(",") if f]
    a.method_list = [m for m in a.methods.split(",") if m]
    a.peft_list = [m for m in a.peft.split(",") if m]
    for f in a.family_list:
        if f not in FAMILIES:
            p.error(f"unknown family {f!r}; choose from {', '.join(FAMILIES)}")
    for m in a.method_list:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return a


def _key(r: dict) -> tuple:
    return (r["family"], r["peft"], r["method"], r["T"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    C.setup_threads(1)
    import chaintune
    from chaintune.adapters import apply_lora
    from chaintune.plan.memory import measure_peak
    from chaintune.rewards import FunctionReward

    t_start = time.time()
    dtype = getattr(torch, args.dtype)
    mode = "quick" if args.quick else ("native" if args.device == "cuda" else "cpu")
    out = C.out_dir(args)
    path = out / "scale.json"
    old = json.loads(path.read_text()) if args.resume and path.exists() else {}
    rows = [r for r in old.get("rows", [])]
    models = dict(old.get("models", {}))
    for other in args.merge:
        extra = json.loads(other.read_text())
        better = {_key(r) for r in extra["rows"] if "peak_mib" in r}  # a measurement replaces a skip
        rows = [r for r in rows if "peak_mib" in r or _key(r) not in better]
        have = {_key(r) for r in rows}
        rows += [r for r in extra["rows"] if _key(r) not in have]
        models.update(extra.get("models", {}))
        old["seconds"] = old.get("seconds", 0) + extra.get("seconds", 0)
        old.setdefault("config", {}).setdefault("timeouts_s", [])
        old["config"]["timeouts_s"] += extra.get("config", {}).get("timeouts_s", [])
    if args.retry_skipped:
        rows = [r for r in rows if not (r.get("skipped") and r["family"] in args.family_list)]
    done = {_key(r) for r in rows if "peak_mib" in r or r.get("skipped")}
    reward = FunctionReward(brightness, differentiable=True, name="mean-brightness")
    max_bytes = int(args.max_gib * 2**30)

    # the timeouts of every invocation that measured rows (--resume/--merge runs add theirs)
    timeout = int(args.timeout) if float(args.timeout).is_integer() else args.timeout
    timeouts = set(old.get("config", {}).get("timeouts_s", [])) | ({timeout} if args.family_list else set())

    def save() -> dict:
        result = {"config": {"families": sorted({r["family"] for r in rows}), "steps": sorted({r["T"] for r in rows}),
                             "methods": list(METHODS), "n": args.n, "eta": 1.0, "device": args.device,
                             "dtype": args.dtype, "quick": args.quick, "timeouts_s": sorted(timeouts),
                             "max_gib": args.max_gib, "reward": "mean brightness of the stand-in decode",
                             "lora": "rank 4 on to_q, to_k, to_v, to_out.0"},
                  "method": "one chaintune.estimate_gradient per row via chaintune.plan.memory.measure_peak: "
                            "forked child, peak RSS above the loaded model (CPU) or allocator peak (CUDA); "
                            "time_ratio = estimate seconds / no-grad sampling seconds at the same T",
                  "machine": C.machine(), "models": models, "rows": rows,
                  "seconds": round(time.time() - t_start + old.get("seconds", 0), 1)}
        C.write_json(path, result)
        return result

    for family in args.family_list:
        for peft in args.peft_list:
            if all((family, peft, k, T) in done for k in ["no-grad sampling", *args.method_list]
                   for T in args.steps_list):
                continue
            # a fresh build per trainable set: LoRA layers stay out of the full-weights run
            C.log(f"building {FAMILIES[family]['name']} ({mode}, {args.dtype}) for {peft} ...")
            t0 = time.time()
            m, info = build(family, mode, dtype, latent=args.latent, seed=args.seed)
            m.to(args.device)
            info["build_seconds"] = round(time.time() - t0, 1)
            C.log(f"  {info['parameters'] / 1e6:.0f}M parameters, latents {info['latent_shape']} "
                  f"({info['build_seconds']} s)"
                  + (f" - REDUCED DEPTH: {info['depth']}" if info["depth_reduced"] else ""))
            if peft == "lora":
                apply_lora(m.denoiser, rank=4)
            else:
                m.denoiser.requires_grad_(True)
            trainable = sum(p.numel() for p in m.denoiser.parameters() if p.requires_grad)
            planner = _planner_view(m, args, max_bytes)
            if "h_star" in planner:  # a --resume run at other T keeps the h* of the earlier ones
                planner["h_star"] = {**models.get(f"{family}/{peft}", {}).get("planner", {}).get("h_star", {}),
                                     **planner["h_star"]}
            models[f"{family}/{peft}"] = {**info, "peft": peft, "trainable_parameters": trainable,
                                          "planner": planner}
            # warm-up in this process (lazy initialisations), so children measure only the estimate
            chaintune.estimate_gradient(m, reward, "rlr", n=1, steps=2, eta=1.0, h=1,
                                        generator=torch.Generator().manual_seed(0))
            for T in args.steps_list:
                base = {"family": family, "peft": peft, "T": T, "trainable_parameters": trainable}
                skey = (family, peft, "no-grad sampling", T)
                if skey in done:
                    sample = next(r for r in rows if _key(r) == skey)
                else:
                    def sampling(m=m, T=T) -> dict:
                        chaintune.sample(m, args.n, steps=T, eta=1.0, generator=torch.Generator().manual_seed(0))
                        return {}

                    sample = {**base, "method": "no-grad sampling", **_clean(measure_peak(
                        sampling, args.device, timeout=args.timeout, max_bytes=max_bytes))}
                    rows.append(sample)
                    _report(sample)
                    save()
                for label in args.method_list:
                    if (family, peft, label, T) in done:
                        continue
                    est, opts, ckpt = METHODS[label]

                    def work(m=m, est=est, opts=opts, ckpt=ckpt, T=T) -> dict:
                        g = chaintune.estimate_gradient(m, reward, est, n=args.n, steps=T, eta=1.0, checkpoint=ckpt,
                                                        generator=torch.Generator().manual_seed(args.seed), **opts)
                        return {"grad_norm": float(torch.sqrt(sum((v.float() ** 2).sum() for v in g.values())))}

                    res = _clean(measure_peak(work, args.device, timeout=args.timeout, max_bytes=max_bytes))
                    row = {**base, "method": label, "estimator": est, "checkpoint": ckpt, **res}
                    if "seconds" in row and "peak_mib" in row and sample.get("seconds"):
                        row["time_ratio"] = row["seconds"] / sample["seconds"]
                    rows.append(row)
                    _report(row)
                    save()
            del m
    result = save()
    print_table(result)
    plot(result, out / "scale.png")
    return result


def _planner_view(m: StandIn, args, budget: int) -> dict:
    """What ``chaintune plan`` measures on this model (one tracked step, same probe), and the h* it would pick
    for the ``--max-gib`` budget at each T: to set against the measured RLR rows."""
    from chaintune.plan.memory import h_star, measure_step

    try:
        b_h, b_z = measure_step(m, args.n, checkpoint=False, timeout=args.timeout)
    except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
        return {"error": str(e)[:300]}
    return {"b_h_mib": b_h / 2**20, "b_z_mib": b_z / 2**20,
            "h_star": {str(T): h_star(budget, b_h, b_z, T) for T in args.steps_list}}


def _clean(res: dict) -> dict:
    """peak_bytes -> peak_mib; an error becomes ``skipped`` with its reason (timeout, memory cap, exception)."""
    res = dict(res)
    res.pop("traceback", None)
    res.pop("hwm_reset", None)
    if "peak_bytes" in res:
        res["peak_mib"] = res.pop("peak_bytes") / 2**20
        res.pop("rss_before_bytes", None)
    if "error" in res:
        res["skipped"] = res.pop("error")
    return res


def _report(r: dict) -> None:
    C.log(C.memory_row(f"{r['family']:5s} {r['peft']:4s}", r))


def print_table(result: dict) -> None:
    rows = result["rows"]
    Ts = sorted({r["T"] for r in rows})
    by = {_key(r): r for r in rows}
    for fam_peft, info in result["models"].items():
        family, peft = fam_peft.split("/")
        table_rows = []
        for m in ["no-grad sampling", *METHODS]:
            row = {"method": m}
            for T in Ts:
                r = by.get((family, peft, m, T), {})
                row[f"m{T}"] = r.get("peak_mib") if "peak_mib" in r else ("skip" if r.get("skipped") else None)
                row[f"r{T}"] = r.get("time_ratio") if m != "no-grad sampling" else r.get("seconds")
            table_rows.append(row)
        cols = [("method", "method", "s")] + [(f"m{T}", f"T={T} MiB", ".0f") for T in Ts] + [
            (f"r{T}", f"T={T} x", ".1f") for T in Ts]
        reduced = f", REDUCED DEPTH: {info.get('depth') or info['config_changes']}" if info.get("depth_reduced") else ""
        print()
        print(C.table(table_rows, cols, title=(
            f"{info['name']} ({info['parameters'] / 1e6:.0f}M params{reduced}), {peft} "
            f"({info['trainable_parameters']:,} trainable), latents {info['latent_shape']}, {info['dtype']}: "
            f"peak extra memory of one estimate (MiB) and time / no-grad sampling (x; sampling row: seconds)")))
    print(f"\ntotal {result['seconds']:.0f}s")


def plot(result: dict, path: Path) -> None:
    plt = C.pyplot()
    fams = list(dict.fromkeys(r["family"] for r in result["rows"]))
    if not fams:
        return
    ncols = min(3, len(fams))
    nrows = -(-len(fams) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 4.4 * nrows), squeeze=False)
    for ax in axes.flat[len(fams):]:
        ax.set_visible(False)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, fam in zip(axes.flat, fams, strict=False):
        for peft, style in (("lora", "o-"), ("full", "s--")):
            for m in METHODS:
                pts = sorted((r["T"], r["peak_mib"]) for r in result["rows"]
                             if r["family"] == fam and r["peft"] == peft and r["method"] == m and "peak_mib" in r)
                if pts:
                    T, mem = zip(*pts, strict=True)
                    ax.plot(T, mem, style, color=colors[m], label=f"{m} ({peft})", alpha=0.9)
        info = result["models"].get(f"{fam}/lora") or result["models"].get(f"{fam}/full") or {}
        title = f"{info.get('name', fam)}\nlatents {info.get('latent_shape')}, {info.get('dtype', '')}"
        if info.get("depth_reduced"):
            depth = (info.get("depth") or str(info.get("config_changes"))).replace(" of ", "/").replace("-stream", "")
            title += f"\nREDUCED DEPTH: {depth}"
        ax.set(xlabel="sampling steps T", ylabel="peak extra memory (MiB)", title=title)
        ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
