"""Diff-Tuning: timestep laws, loss composition, knowledge-bank caching, PEFT, backends, CLI."""

import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

from chaintune.adapters import apply_peft
from chaintune.backends.base import Conditions
from chaintune.chain import add_noise
from chaintune.errors import ChaintuneError
from chaintune.testing import tiny_dit_model, tiny_sd_model, tiny_unet, tiny_unet_model
from chaintune.transfer import (
    BankConfig,
    TransferConfig,
    build_bank,
    diff_tuning_loss,
    importance_weights,
    sample_timesteps,
    timestep_probs,
    transfer,
)
from chaintune.transfer import bank as bank_mod
from chaintune.transfer.folding import fold_difffit
from chaintune.transfer.forgetting import analyze, handover_denoise, spearman, write_report

T = 1000
# chi-square critical value for 19 degrees of freedom at 99.9% confidence (scipy.stats.chi2.ppf(0.999, 19))
CHI2_19_999 = 43.82


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; on a shared, loaded CPU two OpenMP threads spin-wait (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _chi_square(t: torch.Tensor, probs: torch.Tensor, bins: int = 20) -> float:
    width = T // bins
    observed = torch.bincount(t // width, minlength=bins).double()
    expected = probs.reshape(bins, width).sum(1) * len(t)
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("kind,power", [("psi", 1.0), ("xi", 1.0), ("psi", 2.0), ("uniform", 1.0)])
def test_sampled_timesteps_follow_psi_and_xi(kind, power):
    """Chi-square goodness of fit on 20 bins, 100k draws, fixed seed: must pass at 99.9% confidence."""
    probs = timestep_probs(T, kind, power)
    t = sample_timesteps(100_000, T, kind, power, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < T
    assert _chi_square(t, probs) < CHI2_19_999
    # and the test has power: the same draws are far from the opposite law
    other = timestep_probs(T, "xi" if kind == "psi" else "psi", 1.0)
    assert _chi_square(t, other) > 100 * CHI2_19_999


def test_psi_increases_and_xi_decreases_and_weights_match_sampling():
    psi, xi = timestep_probs(T, "psi"), timestep_probs(T, "xi")
    assert (psi.diff() > 0).all() and (xi.diff() < 0).all()
    assert psi[0] == pytest.approx(1 / (T * (T + 1) / 2)) and xi[0] == pytest.approx(T / (T * (T + 1) / 2))
    # E_uniform[T p(t) f(t)] = E_p[f(t)]: weighting is an unbiased replacement for sampling
    f = torch.linspace(0, 1, T, dtype=torch.float64) ** 2
    for kind in ("psi", "xi"):
        w = importance_weights(torch.arange(T), T, kind).double()
        assert (w * f).mean() == pytest.approx(float((timestep_probs(T, kind) * f).sum()), rel=1e-5)


def _manual_loss(m, x0, t, noise, cond):
    out = m.model_output(add_noise(m.scheduler, x0, noise, t), t, cond)
    return ((out - noise) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("mode", ["sampling", "weighting"])
def test_loss_is_recon_plus_lambda_retention(tiny_unet_model, mode):
    m = tiny_unet_model
    g = torch.Generator().manual_seed(0)
    x_t, x_b = torch.randn(6, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    n_t, n_b = torch.randn(6, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    t_t, t_b = torch.tensor([999, 700, 500, 300, 10, 0]), torch.tensor([3, 900])
    parts = diff_tuning_loss(m, x_t, Conditions(), x_b, lam=0.1, mode=mode, t_target=t_t, t_bank=t_b,
                             noise_target=n_t, noise_bank=n_b)
    rec, ret = _manual_loss(m, x_t, t_t, n_t, Conditions()), _manual_loss(m, x_b, t_b, n_b, Conditions())
    if mode == "weighting":
        rec = rec * importance_weights(t_t, T, "psi")
        ret = ret * importance_weights(t_b, T, "xi")
    torch.testing.assert_close(parts.recon, rec.mean())
    torch.testing.assert_close(parts.retention, ret.mean())
    torch.testing.assert_close(parts.total, rec.mean() + 0.1 * ret.mean())
    plain = diff_tuning_loss(m, x_t, Conditions(), None, t_target=t_t, noise_target=n_t)
    torch.testing.assert_close(plain.total, _manual_loss(m, x_t, t_t, n_t, Conditions()).mean())
    assert plain.retention == 0
    psi_only = diff_tuning_loss(m, x_t, Conditions(), None, mode=mode, t_target=t_t, noise_target=n_t, psi=True)
    w = importance_weights(t_t, T, "psi") if mode == "weighting" else torch.ones(6)
    torch.testing.assert_close(psi_only.total, (_manual_loss(m, x_t, t_t, n_t, Conditions()) * w).mean())


def test_loss_draws_t_from_psi_and_xi_by_default(tiny_unet_model):
    x = torch.zeros(400, 1, 8, 8)
    with torch.no_grad():
        parts = diff_tuning_loss(tiny_unet_model, x, Conditions(), x, generator=torch.Generator().manual_seed(1))
    assert parts.t_target.float().mean() > 600 and parts.t_bank.float().mean() < 400  # 2T/3 and T/3
    with torch.no_grad():  # without a bank: psi only when asked, uniform (mean T/2) for plain fine-tuning
        psi_only = diff_tuning_loss(tiny_unet_model, x, Conditions(), None, psi=True,
                                    generator=torch.Generator().manual_seed(1))
        plain = diff_tuning_loss(tiny_unet_model, x, Conditions(), None, generator=torch.Generator().manual_seed(1))
    assert psi_only.t_target.float().mean() > 600 and 450 < plain.t_target.float().mean() < 550


@pytest.mark.parametrize("power", [1.0, 1.5])
def test_timestep_laws_and_bank_share_match_the_official_code(power):
    """thuml/Diffusion-Tuning train.py: probs ∝ [i**s for i in 1..1000] (target), [i**s for i in 1000..1]
    (bank), 6 bank images in a batch of 32 at LWF ratio 0.2, loss_t.mean() + 0.1 * loss_s.mean()."""
    official = torch.tensor([i**power for i in range(1, T + 1)], dtype=torch.float64)
    official_rev = torch.tensor([i**power for i in range(T, 0, -1)], dtype=torch.float64)
    torch.testing.assert_close(timestep_probs(T, "psi", power), official / official.sum())
    torch.testing.assert_close(timestep_probs(T, "xi", power), official_rev / official_rev.sum())
    cfg = TransferConfig()
    dt = cfg.diff_tuning
    assert (dt.alpha, dt.beta, dt.lam, dt.bank_share, cfg.optim.batch_size) == (1.0, 1.0, 0.1, 0.2, 32)
    assert cfg.bank_batch() == int(32 * 0.2) == 6


def test_bank_trains_the_null_label_of_a_conditional_model():
    m = tiny_unet_model(num_class_embeds=4)  # 3 classes + null
    seen = []
    orig = m.model_output
    m.model_output = lambda x, t, cond, encoded=None: seen.append(cond) or orig(x, t, cond)
    x = torch.zeros(2, 1, 8, 8)
    with torch.no_grad():
        diff_tuning_loss(m, x, Conditions(labels=torch.tensor([0, 2])), x)
    assert m.null_label == 3
    assert [c.labels.tolist() for c in seen] == [[0, 2, 3, 3]]  # one batch: target labels, then null for the bank


def test_evaluation_samples_the_target_classes_with_the_requested_guidance():
    """A model tuned on classes {1, 2} of a 3-class model is evaluated on those classes only (with
    CFG when asked: the null branch runs beside them)."""
    from chaintune.transfer.data import generate

    m = tiny_unet_model(num_class_embeds=4)
    seen = []
    orig = m.model_output
    m.model_output = lambda x, t, cond, encoded=None: seen.append(cond.labels.clone()) or orig(x, t, cond)
    generate(m, 64, steps=2, eta=1.0, seed=0, classes=torch.tensor([1, 2, 2]))
    assert set(torch.cat(seen).tolist()) == {1, 2} and len(seen) == 2
    seen.clear()
    generate(m, 8, steps=2, eta=1.0, seed=0, classes=torch.tensor([1]), guidance_scale=2.0)
    assert [lab.tolist() for lab in seen] == [[3] * 8 + [1] * 8] * 2
    seen.clear()
    generate(m, 64, steps=2, eta=1.0, seed=0)  # default: every class of the model
    assert set(torch.cat(seen).tolist()) == {0, 1, 2}


def test_bank_is_cached_and_reused(tmp_path, monkeypatch):
    m = tiny_unet_model()
    cfg = BankConfig(size=6, steps=3, seed=1)
    calls = []
    real = bank_mod.sample
    monkeypatch.setattr(bank_mod, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    b1 = build_bank(m, cfg, tmp_path)
    assert b1.generated and len(calls) == 1 and b1.images.shape == (6, 1, 8, 8)
    manifest = json.loads((b1.path / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["steps"] == 3 and manifest["seed"] == 1
    assert manifest["sampler"] == "ddim" and manifest["model_source"] == "tiny-unet"
    mtime = os.stat(b1.path / "bank.safetensors").st_mtime_ns
    b2 = build_bank(m, cfg, tmp_path)
    assert not b2.generated and len(calls) == 1  # the generator was not called again
    assert os.stat(b1.path / "bank.safetensors").st_mtime_ns == mtime
    torch.testing.assert_close(b2.latents, b1.latents)
    b3 = build_bank(m, BankConfig(size=6, steps=3, seed=2), tmp_path)  # other settings: a new bank
    assert b3.generated and len(calls) == 2 and b3.path != b1.path
    with torch.no_grad():
        next(m.denoiser.parameters()).add_(1.0)  # other weights under the same source name: regenerate
    assert build_bank(m, cfg, tmp_path).generated and len(calls) == 3


def _numel(module: nn.Module, pred) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if pred(n))


def test_peft_methods_train_exactly_the_intended_parameters():
    full = tiny_unet()
    n_all = sum(p.numel() for p in full.parameters())
    counts = {}
    for method in ("none", "lora", "bitfit", "difffit"):
        u = tiny_unet()
        names = apply_peft(u, method, rank=2)
        counts[method] = sum(p.numel() for p in u.parameters() if p.requires_grad)
        if method == "none":
            assert counts[method] == n_all
        elif method == "lora":
            assert all("lora_" in n for n in names)
            # one A (r x in) and B (out x r) per attention projection: 4 targets in the mid-block attention
            ch = 16
            assert counts[method] == 4 * (2 * ch * 2)
        elif method == "bitfit":
            assert counts[method] == _numel(full, lambda n: n.endswith(".bias"))
        else:
            norms = sum(p.numel() for m in full.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters())
            biases_not_in_norms = _numel(full, lambda n: n.endswith(".bias")) - sum(
                m.bias.numel() for m in full.modules() if isinstance(m, nn.GroupNorm))
            blocks = sum(type(m).__name__ in ("ResnetBlock2D", "Attention") for m in full.modules())
            assert sum(n.endswith("difffit_gamma") for n in names) == blocks == 9
            assert counts[method] == norms + biases_not_in_norms + blocks
    assert counts["lora"] < counts["bitfit"] < counts["difffit"] < counts["none"]


@pytest.mark.parametrize("method", ["lora", "bitfit", "difffit"])
def test_peft_training_moves_only_trainable_parameters(tiny_unet_model, method, tmp_path):
    import copy

    m = copy.deepcopy(tiny_unet_model)
    before = {n: p.detach().clone() for n, p in m.denoiser.named_parameters()}
    cfg = TransferConfig.from_dict(dict(method="plain", peft=method, steps=3, batch_size=4, lr=1e-2, eval_data=None,
                                        grid_samples=2, sample_steps=2, log_every=1))
    res = transfer(cfg, model=m, target=(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)),
                   show_progress=False)
    trainable = set(res.trainable)
    for n, p in m.denoiser.named_parameters():
        if n in before:
            moved = not torch.equal(p.detach(), before[n])
            assert moved == (n in trainable), n


def test_difffit_scales_fold_into_plain_weights():
    import copy

    u = tiny_unet()
    apply_peft(u, "difffit")
    with torch.no_grad():
        for n, p in u.named_parameters():
            if n.endswith("difffit_gamma"):
                p.fill_(0.6)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        ref = u(x, t).sample
        assert not torch.allclose(ref, tiny_unet()(x, t).sample, atol=1e-4)
        folded = fold_difffit(copy.deepcopy(u))
        torch.testing.assert_close(folded(x, t).sample, ref, rtol=1e-5, atol=1e-5)
    assert not any("difffit" in n for n, _ in folded.named_parameters())


def _small_cfg(tmp_path, **kw):
    base = dict(steps=3, batch_size=5, bank_share=0.4, bank_size=4, bank_steps=2, bank_dir=str(tmp_path / "banks"),
                eval_data=None, grid_samples=2, sample_steps=2, log_every=1)
    return TransferConfig.from_dict({**base, **kw})


def test_transfer_dit_backend(tmp_path):
    m = tiny_dit_model(num_classes=4)
    target = (torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1]))
    res = transfer(_small_cfg(tmp_path, peft="difffit"), model=m, target=target, show_progress=False,
                   out=tmp_path / "run")
    assert res.bank is not None and res.bank.latents.shape[1:] == (4, 8, 8) and res.bank.labels is not None
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    from chaintune.backends import load

    assert load(tmp_path / "run").kind == "dit"


def test_transfer_sd_backend(tmp_path):
    m = tiny_sd_model()
    target = (torch.rand(6, 3, 16, 16), torch.zeros(6, dtype=torch.long))
    res = transfer(_small_cfg(tmp_path, peft="lora", prompt="a {label}"), model=m, target=target,
                   show_progress=False, out=tmp_path / "run")
    assert res.bank.images.shape == (4, 3, 16, 16) and res.bank.manifest["prompts"] == [""]
    assert len(res.history) >= 3
    assert (tmp_path / "run" / "adapter").is_dir() and (tmp_path / "run" / "model" / "model_index.json").exists()


def test_config_errors_are_clear():
    with pytest.raises(ChaintuneError, match="did you mean 'diff-tuning'"):
        TransferConfig.from_dict(dict(method="diff-tunig")).validate()
    with pytest.raises(ChaintuneError, match="unknown transfer option"):
        TransferConfig.from_dict({"stepz": 3})
    with pytest.raises(ChaintuneError, match="no bank samples"):
        TransferConfig.from_dict(dict(batch_size=2, bank_share=0.1)).validate()
    with pytest.raises(ChaintuneError, match="lam must be >= 0"):
        TransferConfig.from_dict(dict(lam=-0.1)).validate()


def test_retention_on_an_unconditional_model_warns(tmp_path):
    """Bank and target share the only branch of an unconditional model (README: retention then hurts)."""
    target = (torch.rand(6, 1, 8, 8), torch.zeros(6, dtype=torch.long))
    with pytest.warns(UserWarning, match="unconditional"):
        transfer(_small_cfg(tmp_path, steps=1), model=tiny_unet_model(), target=target, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a conditional model: the bank trains its null class
        transfer(_small_cfg(tmp_path, steps=1), model=tiny_unet_model(num_class_embeds=4),
                 target=(target[0], torch.tensor([0, 1, 2, 0, 1, 2])), show_progress=False)


@pytest.mark.parametrize("off", [{"lam": 0.0}, {"bank_share": 0.0}])
def test_diff_tuning_without_retention_builds_no_bank_and_trains_on_target_only(tmp_path, off):
    cfg = _small_cfg(tmp_path, **off)
    cfg.validate()
    assert not cfg.retains() and cfg.bank_batch() == 0
    seen = []
    m = tiny_unet_model()
    orig = m.model_output
    m.model_output = lambda x, t, cond, encoded=None: seen.append(t.clone()) or orig(x, t, cond)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no retention: no warning about it either
        res = transfer(cfg, model=m, target=(torch.rand(6, 1, 8, 8), torch.zeros(6, dtype=torch.long)),
                       show_progress=False)
    assert res.bank is None and not (tmp_path / "banks").exists()
    train_t = [t for t in seen if len(t) == cfg.optim.batch_size]  # the whole batch is target images
    assert len(train_t) == cfg.optim.steps


def test_fid_reference_is_the_held_out_split_of_the_same_domain():
    from chaintune.transfer.data import default_eval_data

    assert default_eval_data("digits-fewshot:10") == "digits:test"
    assert default_eval_data("digits-fewshot-5to9:10") == "digits-5to9:test"
    assert default_eval_data("digits-0to4:train") == "digits-0to4:test"
    assert default_eval_data("glyphs:train") == "glyphs:test"
    assert default_eval_data("/some/folder") is None


def test_handover_switches_model_at_threshold():
    calls = []
    fn = handover_denoise(lambda x, t: calls.append("tuned") or x, lambda x, t: calls.append("base") or x, 400)
    for t in (999, 400, 399, 0):
        fn(torch.zeros(1), torch.tensor(t))
    assert calls == ["tuned", "tuned", "base", "base"]
    assert spearman([1, 2, 3], [1, 5, 9]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_forgetting_analysis_identical_models_forget_nothing(tmp_path):
    m = tiny_unet_model()
    x = torch.rand(8, 1, 8, 8)
    res = analyze(m, m, x, torch.randn(8, 1, 8, 8), eval_images=torch.rand(8, 1, 8, 8), num_timesteps=4,
                  thresholds=[0, 1000], handover_n=8, steps=2)
    assert res["timesteps"] == [0, 333, 666, 999]
    assert max(abs(v) for v in res["forgetting"]) < 1e-6
    assert res["handover"][0]["fid"] == pytest.approx(res["handover"][1]["fid"], rel=1e-4)
    j, p = write_report(res, tmp_path)
    assert json.loads(j.read_text())["timesteps"] == res["timesteps"] and p.stat().st_size > 1000


def test_forgetting_scores_a_conditional_tuned_model_on_the_target_classes():
    """Tuned model: the target's labels; base model: always its null class (target classes are new to it)."""
    base = tiny_unet_model(num_class_embeds=11)  # 10 classes + null (10)
    tuned = copy.deepcopy(base)
    seen: dict[str, list[set[int]]] = {"base": [], "tuned": []}
    for name, m in (("base", base), ("tuned", tuned)):
        def spy(x, t, cond, _f=m.model_output, _name=name):
            seen[_name].append(set(cond.labels.tolist()) if cond.labels is not None else {-1})
            return _f(x, t, cond)
        m.model_output = spy
    y = torch.tensor([5, 7, 7, 5, 7, 5])
    res = analyze(base, tuned, torch.rand(6, 1, 8, 8), torch.randn(4, 1, 8, 8), eval_images=torch.rand(6, 1, 8, 8),
                  num_timesteps=2, thresholds=[500], handover_n=6, steps=2, target_labels=y)
    assert len(res["handover"]) == 1
    assert seen["base"] and all(s in ({10}, {-1}) for s in seen["base"])
    tuned_sets = seen["tuned"]
    assert {5, 7} in tuned_sets  # target losses and hand-over steps
    assert all(s <= {5, 7} or s in ({10}, {-1}) for s in tuned_sets)
    assert any(s in ({10}, {-1}) for s in tuned_sets)  # the bank, unconditionally
    with pytest.raises(ValueError, match="3 target labels for 6 images"):
        analyze(base, tuned, torch.rand(6, 1, 8, 8), None, num_timesteps=2, target_labels=y[:3])


def test_cli_transfer_end_to_end(tmp_path, monkeypatch):
    from diffusers import DDPMPipeline

    from chaintune.cli.main import main

    monkeypatch.setenv("CHAINTUNE_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    tiny_unet_model().save(base)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("bank_size: 8\nbank_steps: 2\nsample_steps: 3\neval_samples: 40\ngrid_samples: 4\n"
                   "batch_size: 10\nlog_every: 2\n")
    out = tmp_path / "runs" / "x"
    args = ["transfer", "--model", str(base), "--data", "digits-fewshot:2", "--method", "diff-tuning", "--peft",
            "difffit", "--steps", "4", "--eval-every", "2", "--out", str(out), "--config", str(cfg)]
    main(args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "fid" in r] == [2, 4] and all("loss" in r for r in rows)
    info = json.loads((out / "chaintune_run.json").read_text())
    assert info["command"] == "transfer" and info["base_model"] == str(base) and info["peft"] == "difffit"
    assert info["config"]["steps"] == 4 and info["status"] == "finished"  # one status word for every trainer
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    DDPMPipeline.from_pretrained(out / "model")
    with pytest.raises(SystemExit) as e:  # refuses to clobber the run
        main(args)
    assert e.value.code == 2
    main(["sample", "--model", str(out), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "grid.png").exists()
    main(["forgetting", "--base", str(base), "--tuned", str(out), "--data", "digits-fewshot:2", "--out",
          str(tmp_path / "f"), "--timesteps", "3", "--samples", "16", "--steps", "2"])
    res = json.loads((tmp_path / "f" / "forgetting.json").read_text())
    assert len(res["forgetting"]) == 3 and len(res["handover"]) == 11
    assert res["bank_path"] == info["bank"]  # the run's own bank settings: its cached bank is reused


def test_a_killed_bank_write_leaves_nothing_behind(tmp_path):
    """A bank write killed mid-way leaves its temp folder in the cache; the next writer of that bank removes it
    under the bank's lock (issue 22: the .tmp stayed forever)."""
    m = tiny_unet_model()
    cfg = BankConfig(size=4, steps=3, seed=5)
    from chaintune.transfer.bank import bank_dir, bank_settings

    path = bank_dir(tmp_path, bank_settings(m, cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    leftover = path.parent / f".{path.name}.k1ll3d.tmp"
    leftover.mkdir()
    (leftover / "bank.safetensors").write_bytes(b"\0" * 100)
    other = tmp_path / ".someone-else.tmp"  # not this bank's: left alone
    other.write_text("x")
    b = build_bank(m, cfg, tmp_path)
    assert b.generated and not leftover.exists() and other.exists()
    assert sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")) == [other.name]


@pytest.mark.parametrize("batch", range(2, 65))
def test_bank_count_truncates_as_the_official_code(batch):
    """thuml/Diffusion-Tuning: ``int(batch_size * 0.2)`` bank images (it differs from rounding at 26 of these 63)."""
    cfg = TransferConfig.from_dict({"batch_size": batch})
    assert cfg.bank_batch() == min(batch - 1, int(batch * 0.2))
