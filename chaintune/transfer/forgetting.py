"""Chain-of-forgetting analysis: where along the chain did fine-tuning change the model?

Two measurements between a base model M0 and its fine-tuned version M1:

1. per-timestep denoising loss of both models on the target data and on the knowledge bank
   (samples of M0, i.e. the source domain), with the *same* images, timesteps and noise for
   both, so differences are paired. ``forgetting(t)`` is M1's excess loss on the bank,
   ``loss_M1(t) - loss_M0(t)``: how much source-domain denoising skill was lost at noise level t.
   It is also reported relative to M0 and in x0 units (eps loss times (1 - a_t) / a_t; flow
   velocity loss times sigma_t^2).
2. hand-over sampling: M1 denoises chain positions with t >= threshold and M0 those below it;
   the FID of the result against held-out target images, per threshold. If low-noise steps are
   domain general (the chain of forgetting), handing them to M0 costs little.

Models that take class labels: given the target's labels, M1 sees them (on the target losses and in
the hand-over chain, with labels drawn at the target's class frequencies), and M0 always runs its
unconditional branch, since the target's classes are new to it; the bank is scored
unconditionally by both, which is the branch Diff-Tuning trains on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from chaintune.backends.base import Conditions, DiffusionModel
from chaintune.chain import Denoise, add_noise, is_flow_scheduler, run_chain, training_target
from chaintune.metrics import fid_kid
from chaintune.sampling import chain_scheduler, initial_noise
from chaintune.transfer.data import draw_labels, encode
from chaintune.utils.io import atomic_file, save_json

__all__ = ["handover_denoise", "per_timestep_losses", "handover_fid", "analyze", "write_report", "spearman",
           "derive_schedule", "measure_schedule"]


def handover_denoise(tuned: Denoise, base: Denoise, threshold: int) -> Denoise:
    """A denoiser that runs ``tuned`` for t >= threshold and ``base`` below it (t is a scalar)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return tuned(x, t) if int(t) >= threshold else base(x, t)

    return fn


@torch.no_grad()
def per_timestep_losses(models: Sequence[DiffusionModel], x0: torch.Tensor, timesteps: Sequence[int], *,
                        cond: Conditions | Sequence[Conditions | None] | None = None, seed: int = 0,
                        batch_size: int = 256, repeats: int = 1) -> torch.Tensor:
    """Mean denoising loss of each model at each timestep: tensor [len(models), len(timesteps)].

    All models see identical (x0, t, noise) triples, so the comparison is paired. ``cond``: one
    Conditions for all models, or one per model (None: the model's unconditional branch).
    """
    conds = list(cond) if isinstance(cond, Sequence) else [cond] * len(models)
    if len(conds) != len(models):
        raise ValueError(f"got {len(conds)} conditions for {len(models)} models")
    sched = models[0].scheduler
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(models), len(timesteps), dtype=torch.float64)
    for j, t_val in enumerate(timesteps):
        for _ in range(repeats):
            noise = torch.randn(x0.shape, generator=g)
            for s in range(0, len(x0), batch_size):
                xb, nb = x0[s : s + batch_size], noise[s : s + batch_size]
                t = torch.full((len(xb),), int(t_val), dtype=torch.long)
                for i, m in enumerate(models):
                    dev = m.device
                    x_t = add_noise(sched, xb.to(dev), nb.to(dev), t.to(dev))
                    c = _null(m, len(xb)) if conds[i] is None else conds[i].subset(range(s, s + len(xb)))
                    pred = m.model_output(x_t, t.to(dev), c).float()
                    tgt = training_target(sched, xb.to(dev), nb.to(dev), t.to(dev)).float()
                    out[i, j] += F.mse_loss(pred, tgt, reduction="sum").item() / xb[0].numel()
        out[:, j] /= len(x0) * repeats
    return out


def _null(model: DiffusionModel, n: int) -> Conditions:
    return model.null_conditions(n)


def x0_scale(scheduler, timesteps: Sequence[int]) -> torch.Tensor:
    """Per-timestep factor that turns the training-target MSE into an MSE on the implied x0 (float64).

    eps: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), so (1 - a) / a; v: (1 - a); x0: 1;
    flow velocity: x0 = x_t - sigma v, so sigma^2 (sigma = t / num_train_timesteps, as in training).
    """
    ts = torch.as_tensor(list(timesteps), dtype=torch.long)
    if is_flow_scheduler(scheduler):
        return (ts.double() / scheduler.config.num_train_timesteps) ** 2
    ab = scheduler.alphas_cumprod[ts].double()
    pt = scheduler.config.prediction_type
    if pt == "epsilon":
        return (1 - ab) / ab
    if pt == "v_prediction":
        return 1 - ab
    return torch.ones_like(ab)


@torch.no_grad()
def handover_samples(tuned: DiffusionModel, base: DiffusionModel, threshold: int, n: int, *, steps: int = 50,
                     eta: float = 1.0, seed: int = 0, batch_size: int = 250,
                     classes: torch.Tensor | None = None) -> torch.Tensor:
    """Images from the hand-over chain (same initial noise and step noise for every threshold).

    ``classes`` (labelled models): the tuned model's labels are drawn from these, and the base
    model runs its unconditional branch; otherwise both use their default conditions.
    """

    sched = chain_scheduler(tuned, "ddim")
    g = torch.Generator().manual_seed(seed)
    x_T = initial_noise(tuned, n, g)
    labels = draw_labels(tuned, classes, n, torch.Generator().manual_seed(seed + 7))
    imgs = []
    for s in range(0, n, batch_size):
        xb = x_T[s : s + batch_size]
        if labels is not None:
            cond_t, cond_b = Conditions(labels=labels[s : s + len(xb)]), _null(base, len(xb))
        else:
            cond_t = tuned.default_conditions(len(xb), generator=torch.Generator().manual_seed(seed + s))
            cond_b = base.default_conditions(len(xb), generator=torch.Generator().manual_seed(seed + s))
        fn = handover_denoise(tuned.denoise_fn(cond_t), base.denoise_fn(cond_b), threshold)
        gs = torch.Generator().manual_seed(seed + 1 + s)
        traj = run_chain(fn, sched, xb, num_steps=steps, eta=eta, generator=gs)
        imgs.append(tuned.decode(traj.x0).float().cpu())
    return torch.cat(imgs)


def handover_fid(tuned: DiffusionModel, base: DiffusionModel, eval_images: torch.Tensor,
                 thresholds: Sequence[int], *, n: int = 500, steps: int = 50, eta: float = 1.0, seed: int = 0,
                 feature: str = "digits-cnn", classes: torch.Tensor | None = None) -> list[dict]:
    """FID/KID vs held-out target images of the hand-over chain, per threshold."""

    rows = []
    for thr in thresholds:
        imgs = handover_samples(tuned, base, int(thr), n, steps=steps, eta=eta, seed=seed, classes=classes)
        rows.append({"threshold": int(thr), **fid_kid(eval_images, imgs, feature)})
    return rows


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Rank correlation (no scipy needed): +1 when y rises monotonically with x."""
    rx = torch.tensor(x, dtype=torch.float64).argsort().argsort().double()
    ry = torch.tensor(y, dtype=torch.float64).argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp(min=1e-12))


def analyze(base: DiffusionModel, tuned: DiffusionModel, target_images: torch.Tensor,
            bank_latents: torch.Tensor | None = None, *, eval_images: torch.Tensor | None = None,
            num_timesteps: int = 20, thresholds: Sequence[int] | None = None, handover_n: int = 500,
            steps: int = 50, feature: str | None = "digits-cnn", seed: int = 0,
            max_images: int = 1000, target_labels: torch.Tensor | None = None) -> dict:
    """Run both measurements (module docstring) and return a JSON-ready dict.

    ``target_labels``: the class of each target image; a class-conditional tuned model is scored
    with them and samples the hand-over chain at their frequencies.
    """

    T = int(base.scheduler.config.num_train_timesteps)
    ts = torch.linspace(0, T - 1, num_timesteps).round().long().tolist()
    x_tgt = encode(base, target_images[:max_images])
    if target_labels is not None and len(target_labels) != len(target_images):
        raise ValueError(f"got {len(target_labels)} target labels for {len(target_images)} images")
    labels = target_labels[:max_images].long() if target_labels is not None and tuned.takes_labels else None
    cond_t = None if labels is None else Conditions(labels=labels)
    losses_t = per_timestep_losses([base, tuned], x_tgt, ts, cond=[None, cond_t], seed=seed)
    to_x0 = x0_scale(base.scheduler, ts)
    result: dict = {"timesteps": ts, "target": {"base": losses_t[0].tolist(), "tuned": losses_t[1].tolist()}}
    if bank_latents is not None:
        losses_b = per_timestep_losses([base, tuned], bank_latents[:max_images].float(), ts, seed=seed + 1)
        forget = losses_b[1] - losses_b[0]
        result["bank"] = {"base": losses_b[0].tolist(), "tuned": losses_b[1].tolist()}
        result["forgetting"] = forget.tolist()
        result["forgetting_relative"] = (forget / losses_b[0].clamp(min=1e-12)).tolist()
        result["forgetting_x0"] = (forget * to_x0).tolist()
        result["forgetting_spearman"] = spearman(ts, result["forgetting_relative"])
    result["target_gain"] = (losses_t[0] - losses_t[1]).tolist()
    if eval_images is not None and feature:
        thresholds = list(thresholds) if thresholds is not None else [0, 100, 200, 300, 400, 500, 600, 700, 800,
                                                                       900, T]
        result["handover"] = handover_fid(tuned, base, eval_images, thresholds, n=handover_n, steps=steps,
                                          seed=seed, feature=feature, classes=labels)
        result["handover_spearman"] = spearman([r["threshold"] for r in result["handover"]],
                                               [r["fid"] for r in result["handover"]])
    return result


# bounds of the derived powers: below -1 a power law's mean position no longer follows (a + 1) / (a + 2); above 4 a
# law puts nearly all its mass on the last tenth of the chain
POWER_RANGE = (-0.9, 4.0)


def _power_from_mean(m: float) -> float:
    """The power a of p(i) ∝ (i + 1)^a on 0..T-1 whose mean position is ``m`` (a fraction of T): for a > -1 the
    continuous law's mean is (a + 1) / (a + 2), so a = (2m - 1) / (1 - m)."""
    a = (2 * m - 1) / max(1 - m, 1e-6)
    return float(min(max(a, POWER_RANGE[0]), POWER_RANGE[1]))


def derive_schedule(timesteps: Sequence[int], base_loss: Sequence[float], tuned_loss: Sequence[float],
                    num_train_timesteps: int, lam: float = 0.1) -> dict:
    """Diff-Tuning's ψ/ξ powers (alpha, beta) and retention weight from a chain-of-forgetting measurement.

    ``base_loss`` / ``tuned_loss``: the per-timestep training loss (:func:`per_timestep_losses`) of the base model
    and of a plainly fine-tuned one on held-out *target* images. The gain g(t) = max(0, base - tuned) says where
    along the chain the target needs what the base does not know:

    * ψ(t) ∝ (t + 1)^alpha puts the target's (reconsolidation) training there: alpha such that ψ's mean position
      equals the gain's, sum t g(t) / sum g(t);
    * ξ(t) ∝ (T - t)^beta puts retention where the base already serves the target, s(t) = 1 - g(t) / max g:
      beta such that ξ's mean distance from T equals s's;
    * lam = ``lam`` x 2 mean(s): the paper's weight where s is its linear ramp (alpha = beta = 1 assume the
      target's need grows linearly with t: mean 1/2), less where the base serves little of the chain.

    Negative powers are allowed (a law that falls with t): the measurement may say the target differs from the
    source at low noise, the opposite of the paper's premise. Both laws accept them (timesteps.timestep_probs)."""
    ts = torch.as_tensor(list(timesteps), dtype=torch.float64)
    gain = (torch.as_tensor(list(base_loss), dtype=torch.float64)
            - torch.as_tensor(list(tuned_loss), dtype=torch.float64)).clamp(min=0)
    T = float(num_train_timesteps)
    if not float(gain.sum()) > 0:  # fine-tuning changed nothing measurable: keep the paper's schedule
        return {"alpha": 1.0, "beta": 1.0, "lam": lam, "gain": gain.tolist(), "timesteps": ts.long().tolist(),
                "note": "no gain measured; the paper's schedule"}
    serves = 1 - gain / gain.max()
    m_psi = float((ts * gain).sum() / gain.sum()) / T
    m_xi = float(((T - ts) * serves).sum() / serves.sum()) / T if float(serves.sum()) > 0 else 0.5
    return {"alpha": round(_power_from_mean(m_psi), 3), "beta": round(_power_from_mean(m_xi), 3),
            "lam": round(float(lam * 2 * serves.mean()), 4), "gain": gain.tolist(), "timesteps": ts.long().tolist(),
            "gain_mean_t": round(m_psi * T, 1)}


def measure_schedule(base: DiffusionModel, tuned: DiffusionModel, images: torch.Tensor,
                     labels: torch.Tensor | None = None, *, num_timesteps: int = 20, repeats: int = 2,
                     seed: int = 0, max_images: int = 500, lam: float = 0.1) -> dict:
    """:func:`derive_schedule` from the paired per-timestep losses of ``base`` and ``tuned`` on held-out target
    ``images`` (a labelled tuned model sees ``labels``; the base its unconditional branch, as in :func:`analyze`)."""
    T = int(base.scheduler.config.num_train_timesteps)
    ts = torch.linspace(0, T - 1, num_timesteps).round().long().tolist()
    x = encode(base, images[:max_images])
    lab = labels[:max_images].long() if labels is not None and tuned.takes_labels else None
    losses = per_timestep_losses([base, tuned], x, ts, cond=[None, None if lab is None else Conditions(labels=lab)],
                                 seed=seed, repeats=repeats)
    return derive_schedule(ts, losses[0].tolist(), losses[1].tolist(), T, lam=lam)


def write_report(result: dict, out: str | Path, title: str = "chain of forgetting") -> tuple[Path, Path]:
    """``forgetting.json`` and ``forgetting.png`` (loss curves, forgetting, hand-over FID) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "forgetting.json"
    save_json(jpath, result)
    ts = result["timesteps"]
    panels = 1 + ("forgetting" in result) + ("handover" in result)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(ts, result["target"]["base"], "b--", label="base, target")
    ax.plot(ts, result["target"]["tuned"], "b-", label="tuned, target")
    if "bank" in result:
        ax.plot(ts, result["bank"]["base"], "r--", label="base, bank")
        ax.plot(ts, result["bank"]["tuned"], "r-", label="tuned, bank")
    ax.set(xlabel="t", ylabel="denoising loss", title="loss per timestep", yscale="log")
    ax.legend(fontsize=7)
    k = 1
    if "forgetting" in result:
        ax = axes[0][k]
        ax.plot(ts, result["forgetting_relative"], "k-o", ms=3)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set(xlabel="t", ylabel="(tuned - base) / base on bank",
               title=f"forgetting (Spearman {result['forgetting_spearman']:.2f})")
        k += 1
    if "handover" in result:
        ax = axes[0][k]
        thr = [r["threshold"] for r in result["handover"]]
        ax.plot(thr, [r["fid"] for r in result["handover"]], "g-o", ms=3)
        ax.set(xlabel="hand-over threshold t (base model below)", ylabel="FID vs held-out target",
               title="hand-over to the base model")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    ppath = out / "forgetting.png"
    with atomic_file(ppath, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return jpath, ppath
