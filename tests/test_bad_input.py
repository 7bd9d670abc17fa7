"""Bad input ends in one clear line on stderr and a non-zero exit — never a traceback or lost data."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chaintune.cli.main import main

FAST = ["--steps", "2", "--batch-size", "4", "--sample-steps", "4", "--eval-samples", "4", "--no-tensorboard"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    # progress bars also write to stderr (\r-separated updates); the error itself must be one line
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert code != 0
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``root`` -> (mtime_ns, size) for files, None for folders (their mtime changes when a
    command legitimately adds a file beside ours; what matters is that nothing is replaced or removed)."""
    out: dict[str, tuple[int, int] | None] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = None if p.is_dir() else (st.st_mtime_ns, st.st_size)
    return out


def assert_nothing_lost(before: dict[str, tuple[int, int] | None], root: Path) -> None:
    """No file or folder that existed before the command was changed or removed."""
    after = snapshot(root)
    lost = sorted(k for k in before if k not in after)
    changed = sorted(k for k, v in before.items() if k in after and v is not None and after[k] != v)
    assert not lost and not changed, f"removed: {lost}, changed: {changed}"


@pytest.fixture
def user_files(tmp_path, monkeypatch) -> Path:
    """A cwd holding the user's files, plus an ``out/`` folder with files of their own (not a run)."""
    import os

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHAINTUNE_CACHE", str(tmp_path / ".cache"))
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits.npz").write_bytes(b"\0" * 64)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "photo.png").write_bytes(b"\x89PNG precious")
    (tmp_path / "out" / "paper.tex").write_text("\\section{keep}")
    for p in tmp_path.rglob("*"):  # an old mtime, so a rewrite within the same clock tick still shows
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    return tmp_path


@pytest.fixture
def bad_rewards(tmp_path, monkeypatch):
    (tmp_path / "badrewards.py").write_text(textwrap.dedent("""
        import torch
        def nan(images, **kw):
            return torch.full((images.shape[0],), float("nan"))
        def wrong_shape(images, **kw):
            return torch.zeros(images.shape[0], 2)
        def nan_grad(images, **kw):
            # finite value, NaN gradient: d sqrt(0 * x) / dx = inf * 0
            return torch.sqrt(images * 0).flatten(1).sum(1)
        nan_grad.differentiable = True
        def turns_nan(images, **kw):
            # a good reward until a file named `poison` appears in the cwd, then nan_grad
            import os
            if os.path.exists("poison"):
                return nan_grad(images)
            return images.flatten(1).mean(1)
        turns_nan.differentiable = True
        def complex_values(images, **kw):
            return images.flatten(1).mean(1) * (1 + 1j)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "args,needles",
    [
        (["sample", "--model", "builtin:digts", "--num", "2"], ["did you mean builtin:digits"]),
        (["sample", "--model", "/no/such/model/dir", "--num", "2"], ["/no/such/model/dir"]),
        (["align", "--reward", "digt:3", *FAST], ["did you mean 'digit'"]),
        (["align", "--estimator", "rlrr", *FAST], ["did you mean 'rlr'"]),
        (["align", "--h", "30", "--sample-steps", "20", "--steps", "1"], ["h=30"]),
        (["plan", "--memory-budget", "1KB"], ["memory budget"]),
        (["plan", "--memory-budget", "lots"], ["cannot read memory budget"]),
        (["sample", "--num", "2", "--label", "3"], ["not class-conditional"]),
        (["forgetting", "--base", "builtin:digits", "--tuned", "builtin:digits", "--data", "digits:test",
          "--bank-labels", "0,x", "--samples", "0"], ["bank labels", "'0,x'"]),
    ],
    ids=["model-typo", "model-missing", "reward-typo", "estimator-typo", "h-too-large", "budget-too-small",
         "budget-unreadable", "labels-on-unconditional", "bank-labels-unreadable"],
)
def test_bad_names_and_options(capsys, tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("fn,needle", [("nan", "NaN"), ("wrong_shape", "shape"), ("complex_values", "complex values")])
def test_broken_reward_output(capsys, bad_rewards, fn, needle):
    code, _, err = run_cli(capsys, "align", "--reward", f"badrewards:{fn}", "--estimator", "reinforce",
                           "--out", "run", *FAST)
    assert_one_line_error(code, err, needle)
    assert not (bad_rewards / "run").exists()  # caught on a probe batch, before the run directory is made


def test_existing_run_is_refused_and_kept(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "align", "--out", str(run), *FAST)
    assert_one_line_error(code, err, "--resume", "--overwrite")
    assert (run / "precious.txt").read_text() == "keep me"


def test_config_typo_suggests(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.001\nbatch_sise: 4\n")
    code, _, err = run_cli(capsys, "align", "--config", str(cfg), "--out", "run")
    assert_one_line_error(code, err, "batch_sise", "batch_size")
    assert not (tmp_path / "run").exists()


def test_pretrain_config_typo(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("steps: 1\nbatchsize: 4\n")
    code, _, err = run_cli(capsys, "pretrain", "--config", "p.yaml", "--out", "m")
    assert_one_line_error(code, err, "batchsize", "batch_size")
    assert not (tmp_path / "m").exists()


def test_corrupt_checkpoint_on_resume(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "align", "--out", "run", "--save-every", "2", *FAST)
    assert code == 0, err
    ck = tmp_path / "run" / "checkpoints" / "step_000002"
    (ck / "trainer.json").write_text("{not json")
    (ck / "trainable.safetensors").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "align", "--out", "run", "--resume", *FAST, "--steps", "4")
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert code == 2 and "Traceback" not in err
    assert all(ln.startswith("warning") for ln in lines[:-1]), err  # "trying the previous checkpoint"
    assert lines[-1].startswith("error:") and "corrupt" in lines[-1], err


def test_pickled_weights_refused(capsys, tmp_path, monkeypatch):
    import torch

    from chaintune.testing import tiny_unet

    monkeypatch.chdir(tmp_path)
    tiny_unet().save_pretrained(tmp_path / "m", safe_serialization=False)
    assert list((tmp_path / "m").glob("*.bin"))
    code, _, err = run_cli(capsys, "sample", "--model", str(tmp_path / "m"), "--num", "1", "--steps", "2",
                           "--out", "s")
    assert_one_line_error(code, err, "pickled", "--allow-pickle")
    code, _, err = run_cli(capsys, "sample", "--model", str(tmp_path / "m"), "--num", "1", "--steps", "2",
                           "--out", "s", "--allow-pickle")
    assert code == 0, err
    del torch


def test_nan_gradients_skip_then_stop_keeping_last_checkpoint(capsys, bad_rewards):
    code, _, err = run_cli(capsys, "align", "--out", "run", "--estimator", "truncated-backprop", "--save-every", "2",
                           "--reward", "badrewards:turns_nan", *FAST)
    assert code == 0, err
    ckpt = bad_rewards / "run" / "checkpoints" / "step_000002"
    before = (ckpt / "trainable.safetensors").read_bytes()
    (bad_rewards / "poison").touch()
    code, _, err = run_cli(capsys, "align", "--out", "run", "--resume", "--trust-code", "--steps", "6",
                           "--max-bad-steps", "2")
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert code != 0 and "Traceback" not in err
    assert any("non-finite gradient" in ln and ln.startswith("warning") for ln in lines)
    assert lines[-1].startswith("error:") and "non-finite" in lines[-1]
    assert (ckpt / "trainable.safetensors").read_bytes() == before
    info = json.loads((bad_rewards / "run" / "chaintune_run.json").read_text())
    assert info["status"].startswith("failed")


def test_subprocess_exit_code_and_single_line():
    """The installed entry point behaves the same as main()."""
    p = subprocess.run([sys.executable, "-m", "chaintune.cli.main", "align", "--estimator", "nope"],
                       capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120)
    assert p.returncode == 2
    assert [ln for ln in p.stderr.splitlines() if ln.strip()][-1].startswith("error: unknown estimator")


# --- the bad-input matrix ------------------------------------------------------------------------------------
# Each case: exit 2, exactly one `error:` line, no traceback, and no file the user had (in the cwd and in an
# existing `out/` folder) changed or removed. Tiny settings: a case that is wrongly accepted must finish fast.

TINY = ["--steps", "1", "--batch-size", "2", "--sample-steps", "3", "--eval-samples", "2", "--no-tensorboard",
        "--no-progress"]
ALIGN = ["align", "--out", "run", *TINY]
TRANSFER = ["transfer", "--out", "run", "--data", "digits-fewshot:2", "--bank-size", "2", "--bank-share", "0.5",
            *TINY]
FORGET = ["forgetting", "--base", "builtin:digits", "--tuned", "builtin:digits", "--data", "digits:test",
          "--samples", "0", "--timesteps", "2", "--bank-size", "2", "--out", "out"]
SAMPLE = ["sample", "--num", "2", "--steps", "2", "--out", "out"]
PRETRAIN = ["--out", "run", "--steps", "1", "--batch-size", "2", "--eval-samples", "2", "--no-tensorboard",
            "--no-progress"]
# 338 bytes that expand to 9^7 = 4.8M strings (a "billion laughs" file); as a value it used to be echoed whole
YAML_BOMB = "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]\n" for p, k in zip("abcdef", "bcdefg", strict=True))
YAML_BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + YAML_BOMB + "steps: *g\n"

# (id, argv, files to write in the cwd first, needles in the error line)
MATRIX: list[tuple[str, list[str], dict[str, str], list[str]]] = [
    ("unknown-option", [*ALIGN, "--bogus", "1"], {}, ["No such option: --bogus"]),
    ("unknown-option-sample", [*SAMPLE, "--nmu", "3"], {}, ["No such option: --nmu"]),
    ("missing-value", ["align", "--steps"], {}, ["--steps", "requires an argument"]),
    ("missing-value-forgetting", ["forgetting", "--base"], {}, ["--base", "requires an argument"]),
    *[(f"mistyped-{cmd}", [typo], {}, [f"No such command '{typo}'", cmd]) for cmd, typo in [
        ("sample", "smaple"), ("pretrain", "pretrian"), ("align", "algin"), ("demo", "deom"), ("plan", "plna"),
        ("transfer", "trasnfer"), ("forgetting", "forgeting"), ("report", "reprot")]],
    ("eval-every-negative", [*ALIGN, "--eval-every", "-1"], {}, ["eval_every", "-1"]),
    ("save-every-negative", [*ALIGN, "--save-every", "-1"], {}, ["save_every", "-1"]),
    ("transfer-save-every-negative", [*TRANSFER, "--save-every", "-1"], {}, ["save_every", "-1"]),
    ("sigma-zero", [*ALIGN, "--sigma", "0"], {}, ["sigma"]),
    ("eta-nan", [*ALIGN, "--eta", "nan"], {}, ["eta", "nan"]),
    ("sample-eta-nan", [*SAMPLE, "--eta", "nan"], {}, ["--eta", "nan"]),
    ("inner-epochs-zero", [*ALIGN, "--inner-epochs", "0"], {}, ["inner_epochs"]),
    ("clip-range-negative", [*ALIGN, "--clip-range", "-1"], {}, ["clip_range"]),
    ("keep-checkpoints-zero", [*ALIGN, "--keep-checkpoints", "0"], {}, ["keep_checkpoints"]),
    ("steps-not-a-number", [*ALIGN, "--steps", "ten"], {}, ["--steps", "integer"]),
    ("config-steps-not-a-number", ["align", "--config", "c.yaml", "--out", "run"], {"c.yaml": 'steps: "ten"\n'},
     ["steps", "ten"]),
    ("config-malformed-yaml", ["align", "--config", "c.yaml", "--out", "run"], {"c.yaml": "steps: [1,\nlr: 0.1\n"},
     ["c.yaml", "not valid YAML"]),
    ("config-yaml-python-tag", ["align", "--config", "c.yaml", "--out", "run"],
     {"c.yaml": "steps: !!python/object/apply:os.system ['touch pwned']\n"}, ["c.yaml", "not valid YAML"]),
    ("config-toml-syntax", ["transfer", "--config", "c.toml", "--out", "run"], {"c.toml": "[optim\nsteps = 1\n"},
     ["c.toml", "not valid TOML"]),
    ("device-cuda-align", [*ALIGN, "--device", "cuda"], {}, ["cuda"]),
    ("device-cuda-transfer", [*TRANSFER, "--device", "cuda"], {}, ["cuda"]),
    ("device-cuda-sample", [*SAMPLE, "--device", "cuda"], {}, ["cuda", "--device cpu"]),
    ("forgetting-timesteps-zero", [*FORGET, "--timesteps", "0"], {}, ["--timesteps", "greater than or equal to 2"]),
    ("j-reversed", [*ALIGN, "--j", "20,10"], {}, ["j must", "20,10"]),
    ("j-past-the-chain", ["align", "--out", "run", "--j", "2,100", "--sample-steps", "20", "--steps", "1",
                          "--batch-size", "2", "--eval-samples", "2", "--no-tensorboard", "--no-progress"], {},
     ["j", "100", "20"]),
    ("label-on-unconditional", [*ALIGN, "--label", "3"], {}, ["not class-conditional"]),
    ("prompt-on-unconditional", [*ALIGN, "--prompt", "x"], {}, ["prompt"]),
    ("sample-prompt-on-unconditional", [*SAMPLE, "--prompt", "x"], {}, ["not prompts", "--prompt"]),
    ("transfer-eval-every-negative", [*TRANSFER, "--eval-every", "-1"], {}, ["eval_every", "-1"]),
    ("config-missing", ["align", "--config", "nope.yaml", "--out", "run"], {}, ["nope.yaml", "not found"]),
    ("sample-guidance-nan", [*SAMPLE, "--guidance-scale", "nan"], {}, ["--guidance-scale", "nan"]),
    ("sample-out-under-a-file", ["sample", "--num", "2", "--steps", "2", "--out", "notes.txt/s"], {},
     ["notes.txt", "lies under the file"]),
    ("forgetting-inception-without-opt-in", [*FORGET, "--samples", "2", "--feature", "inception:inc.pt"],
     {"inc.pt": "stands in for a TorchScript file"}, ["inc.pt", "--allow-pickle"]),
    ("transfer-inception-without-opt-in", [*TRANSFER, "--feature", "inception:inc.pt"],
     {"inc.pt": "stands in for a TorchScript file"}, ["inc.pt", "CHAINTUNE_ALLOW_PICKLE=1"]),
    ("sample-outputs-exist", ["sample", "--num", "2", "--steps", "2", "--out", "old"],
     {"old/grid.png": "precious"}, ["old/grid.png", "already exists", "--overwrite"]),
    ("forgetting-outputs-exist", [*FORGET[:-1], "old"], {"old/forgetting.json": "{}"},
     ["old/forgetting.json", "already exists", "--overwrite"]),
    # issue 22: hangs and internal errors on the user's input
    ("sample-num-billion", ["sample", "--num", "1000000000", "--steps", "2", "--out", "s"], {},
     ["--num 1000000000", "GiB", "at most"]),
    ("sample-model-root", ["sample", "--model", "/", "--num", "1", "--steps", "2", "--out", "s"], {},
     ["/ is not a diffusers model directory"]),
    ("sample-seed-2**64", [*SAMPLE, "--seed", str(2**64)], {}, ["--seed", str(2**63 - 1)]),
    ("align-seed-2**64", [*ALIGN, "--seed", str(2**64)], {}, ["seed", "64 bits"]),
    ("config-yaml-nested-10000", ["align", "--config", "c.yaml", "--out", "run"],
     {"c.yaml": "steps: " + "[" * 10_000 + "]" * 10_000 + "\n"}, ["c.yaml", "nested more than"]),
    ("config-toml-nested-10000", ["align", "--config", "c.toml", "--out", "run"],
     {"c.toml": "steps = " + "[" * 10_000 + "]" * 10_000 + "\n"}, ["c.toml", "nested"]),
    ("config-yaml-alias-bomb", ["align", "--config", "c.yaml", "--out", "run"], {"c.yaml": YAML_BOMB},
     ["c.yaml", "expands to more than"]),
    ("plan-batch-size-zero", ["plan", "--batch-size", "0"], {}, ["--batch-size must be >= 1"]),
    ("pretrain-resolution-7", ["pretrain", "--resolution", "7", *PRETRAIN], {}, ["--resolution 7", "multiple of 4"]),
    ("pretrain-groups-do-not-divide", ["pretrain", "--block-out-channels", "30", "--block-out-channels", "60",
                                       *PRETRAIN], {}, ["--block-out-channels 30", "--norm-num-groups 16"]),
    ("align-out-under-a-file", ["align", "--out", "notes.txt/run", *TINY], {}, ["notes.txt", "lies under the file"]),
    ("k-past-the-chain", [*ALIGN, "--estimator", "truncated-backprop", "--k", "99"], {}, ["k=99", "sample_steps=3"]),
    ("alignprop-k-past-the-chain", [*ALIGN, "--estimator", "alignprop", "--k", "4"], {}, ["k=4", "sample_steps=3"]),
    ("prompt-file-nested-lists", [*ALIGN, "--prompt-file", "p.json"], {"p.json": '[["a", ["b"]], "c"]'},
     ["p.json", "list of strings", "item 0"]),
    ("prompt-file-numbers", [*ALIGN, "--prompt-file", "p.json"], {"p.json": '["a cat", 3]'}, ["p.json", "item 1"]),
    ("condition-missing-before-the-model", ["sample", "--controlnet", "out", "--condition", "missing.png", "--num",
                                            "1", "--steps", "2", "--out", "s"], {}, ["missing.png", "does not exist"]),
]

# cases whose fix is in a file this test does not own: kept, marked, and listed in the report
XFAIL: dict[str, str] = {}  # cases whose fix is pending elsewhere (none today)


def _case(c):
    marks = [pytest.mark.xfail(strict=True, reason=XFAIL[c[0]])] if c[0] in XFAIL else []
    return pytest.param(*c[1:], id=c[0], marks=marks)


@pytest.mark.parametrize("args,files,needles", [_case(c) for c in MATRIX])
def test_bad_input_matrix(capsys, user_files, args, files, needles):
    import os

    for name, text in files.items():
        (user_files / name).parent.mkdir(parents=True, exist_ok=True)
        (user_files / name).write_text(text)
        os.utime(user_files / name, ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(user_files)
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    assert_one_line_error(code, err, *needles)
    assert_nothing_lost(before, user_files)
    assert not (user_files / "pwned").exists()


def test_combined_reward_is_valid(capsys, user_files):
    """``digit:3+jpeg-compressibility`` is a sum of two rewards, not an unknown name."""
    before = snapshot(user_files)
    code, _, err = run_cli(capsys, "align", "--reward", "digit:3+jpeg-compressibility", "--out", "run", *TINY)
    assert code == 0, err
    assert "Traceback" not in err
    assert (user_files / "run").is_dir()
    assert_nothing_lost(before, user_files)


def test_user_reward_raising_names_reward_and_error(capsys, user_files, monkeypatch):
    (user_files / "bad_input_rewards.py").write_text(textwrap.dedent("""
        def lookup(images, **kw):
            return {"a": 1}["missing"]
    """))
    monkeypatch.syspath_prepend(str(user_files))
    before = snapshot(user_files)
    code, _, err = run_cli(capsys, "align", "--reward", "bad_input_rewards:lookup", "--estimator", "reinforce", *TINY,
                           "--out", "run")
    assert code == 2, err
    assert_one_line_error(code, err, "bad_input_rewards:lookup", "KeyError", "missing")
    assert_nothing_lost(before, user_files)


# --- issue 22: cases that need more than text files ----------------------------------------------------------


def _error_line(err: str) -> str:
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln][-1]


def test_huge_values_are_not_echoed(capsys, user_files):
    """A bad value is shown cut to ~200 characters, whatever its size (an alias bomb's used to fill the disk)."""
    (user_files / "big.yaml").write_text("steps: [" + ", ".join(["123456789"] * 20_000) + "]\n")
    (user_files / "bomb.yaml").write_text(YAML_BOMB)
    before = snapshot(user_files)
    for config, needles in (("big.yaml", ["steps", "a list of 20000 items"]), ("bomb.yaml", ["bomb.yaml"])):
        code, _, err = run_cli(capsys, "align", "--config", config, "--out", "run")
        assert code == 2
        assert_one_line_error(code, err, *needles)
        assert len(err) < 600, err[:1000]
    code, _, err = run_cli(capsys, *ALIGN, "--reward", "x" * 100_000)
    assert_one_line_error(code, err, "unknown reward", "100000 characters")
    assert len(err) < 2000
    assert_nothing_lost(before, user_files)


@pytest.mark.parametrize("command", [["align", "--out", "run"], ["pretrain", "--out", "run"],
                                     ["transfer", "--out", "run"]])
def test_config_naming_a_fifo_is_refused_without_opening_it(capsys, user_files, command):
    import os

    os.mkfifo(user_files / "c.yaml")  # opening it for reading would block until someone writes
    code, _, err = run_cli(capsys, *command, "--config", "c.yaml")
    assert code == 2
    assert_one_line_error(code, err, "c.yaml", "not a regular file")


@pytest.mark.parametrize("args", [["align", "--out", "link", *TINY], ["sample", "--num", "1", "--steps", "2",
                                                                      "--out", "link"]], ids=["align", "sample"])
def test_out_is_a_dangling_symlink(capsys, user_files, args):
    (user_files / "link").symlink_to(user_files / "gone")
    before = snapshot(user_files)
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line_error(code, err, "link", "broken link")
    assert_nothing_lost(before, user_files)
    assert not (user_files / "gone").exists()


@pytest.mark.parametrize("value,needle", [("100000", "more threads than"), ("0", "positive number")])
def test_chaintune_threads_out_of_range(capsys, user_files, monkeypatch, value, needle):
    monkeypatch.setenv("CHAINTUNE_THREADS", value)
    code, _, err = run_cli(capsys, *SAMPLE)
    assert code == 2
    assert_one_line_error(code, err, "CHAINTUNE_THREADS", needle)
    assert not list((user_files / "out").glob("sample_*"))


def test_cache_path_is_a_file(capsys, user_files, monkeypatch):
    (user_files / "cachefile").write_text("not a folder")
    monkeypatch.setenv("CHAINTUNE_CACHE", str(user_files / "cachefile"))
    before = snapshot(user_files)
    code, _, err = run_cli(capsys, *TRANSFER)
    assert code == 2
    assert_one_line_error(code, err, "cachefile", "CHAINTUNE_CACHE")
    assert_nothing_lost(before, user_files)
    assert not (user_files / "run").exists()  # refused before the bank is sampled and the run is made


def test_pretrain_rgb_folder_for_a_one_channel_model(capsys, user_files):
    from PIL import Image

    (user_files / "rgb").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (255 * (i % 2), 0, 200)).save(user_files / "rgb" / f"{i}.png")
    code, _, err = run_cli(capsys, "pretrain", "--dataset", "rgb", *PRETRAIN)
    assert code == 2
    assert_one_line_error(code, err, "rgb", "RGB images", "1-channel")
    assert not (user_files / "run").exists()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that announces ``width`` x ``height`` pixels (PIL checks the size when it opens the file)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind,needle", [("bomb", "too large"), ("over-the-limit", "too large"),
                                         ("truncated", "cannot be decoded"), ("fifo", "not a regular file"),
                                         ("folder", "is a directory")])
def test_bad_condition_image_is_refused_before_any_model_loads(capsys, user_files, monkeypatch, kind, needle):
    import os

    import chaintune.backends.controlled as cn_model

    def no_loading(*a, **kw):
        raise AssertionError("the ControlNet was loaded before the condition image was checked")

    monkeypatch.setattr(cn_model, "load_controlled", no_loading)
    cond = user_files / "cond.png"
    if kind == "bomb":  # past 2x PIL's limit: PIL refuses it itself
        cond.write_bytes(_png_header(20_000, 20_000))
    elif kind == "over-the-limit":  # between 1x and 2x: PIL only warns, and would decode 100M pixels
        cond.write_bytes(_png_header(10_000, 10_000))
    elif kind == "truncated":
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.effect_noise((32, 32), 64).save(buf, format="PNG")  # noise: the pixel data does not compress away
        assert len(buf.getvalue()) > 400
        cond.write_bytes(buf.getvalue()[:200])
    elif kind == "fifo":
        os.mkfifo(cond)
    else:
        cond.mkdir()
    code, _, err = run_cli(capsys, "sample", "--controlnet", "out", "--condition", "cond.png", "--num", "1",
                           "--steps", "2", "--out", "s")
    assert code == 2
    assert_one_line_error(code, err, "cond.png", needle)
    assert not (user_files / "s").exists()


# --- loading a damaged model folder: one input error naming the file, for every backend ---------------------

BACKENDS = {"unet": ("tiny_unet_model", "unet"), "sd": ("tiny_sd_model", "unet"),
            "sdxl": ("tiny_sdxl_model", "unet"), "dit": ("tiny_dit_model", "transformer"),
            "flow": ("tiny_flow_model", "transformer"), "flux": ("tiny_flux_model", "transformer"),
            "wan": ("tiny_wan_model", "transformer")}


@pytest.fixture(scope="module")
def saved_backends(tmp_path_factory) -> Path:
    """Each backend's tiny model saved as the pipeline folder ``chaintune.load`` reads."""
    from chaintune import testing

    root = tmp_path_factory.mktemp("backends")
    for name, (builder, _) in BACKENDS.items():
        getattr(testing, builder)().save(root / name)
    return root


def _corrupt(folder: Path, denoiser: str, how: str) -> str:
    """Damage ``folder`` in one way; returns the file the error must name (relative to ``folder``)."""
    import json

    if how == "model-index-json":
        (folder / "model_index.json").write_text('{"_class_name": ')
        return "model_index.json"
    if how == "config-json":
        (folder / denoiser / "config.json").write_text("{not json")
        return f"{denoiser}/config.json"
    weights = folder / denoiser / "diffusion_pytorch_model.safetensors"
    if how == "truncated-safetensors":
        weights.write_bytes(weights.read_bytes()[:-64])
        return f"{denoiser}/diffusion_pytorch_model.safetensors"
    if how == "truncated-text-encoder":
        te = folder / "text_encoder" / "model.safetensors"
        te.write_bytes(te.read_bytes()[:1000])
        return "text_encoder/model.safetensors"
    if how == "text-encoder-shape":  # transformers' own message names neither the file nor the tensor
        cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
        key = "hidden_size" if "hidden_size" in cfg else "d_model"
        cfg[key] *= 2
        (folder / "text_encoder" / "config.json").write_text(json.dumps(cfg))
        return "text_encoder/model.safetensors"
    assert how == "shape-mismatch"  # the config asks for other sizes than the weights have
    cfg = json.loads((folder / denoiser / "config.json").read_text())
    key = "block_out_channels" if "block_out_channels" in cfg else "attention_head_dim"
    cfg[key] = [2 * c for c in cfg[key]] if isinstance(cfg[key], list) else 2 * cfg[key]
    (folder / denoiser / "config.json").write_text(json.dumps(cfg))
    return f"{denoiser}/diffusion_pytorch_model.safetensors"


DAMAGE = ["model-index-json", "config-json", "truncated-safetensors", "shape-mismatch", "truncated-text-encoder",
          "text-encoder-shape"]


@pytest.mark.parametrize("backend,how", [
    pytest.param(b, how, id=f"{b}-{how}") for b in BACKENDS for how in DAMAGE
    if "text-encoder" not in how or b not in ("unet", "dit")])  # those two have no text encoder
def test_damaged_model_folder_is_one_input_error(capsys, saved_backends, tmp_path, monkeypatch, backend, how):
    import shutil

    monkeypatch.chdir(tmp_path)
    folder = shutil.copytree(saved_backends / backend, tmp_path / backend)
    named = _corrupt(folder, BACKENDS[backend][1], how)
    code, _, err = run_cli(capsys, "sample", "--model", str(folder), "--num", "1", "--steps", "2", "--out", "s")
    assert code == 2, err
    assert_one_line_error(code, err, str(folder / named))
    assert not (tmp_path / "s").exists()


def test_damaged_adapter_of_a_run_is_one_input_error(capsys, tmp_path, monkeypatch):
    """A run that holds only adapter/ (a big model's LoRA) with truncated weights."""
    import json

    from chaintune.backends import RUN_MARKER

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / RUN_MARKER).write_text(json.dumps({"command": "align", "base_model": "builtin:digits", "status": "done"}))
    (run / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    code, _, err = run_cli(capsys, "sample", "--model", "run", "--num", "1", "--steps", "2", "--out", "s")
    assert_one_line_error(code, err, "adapter_model.safetensors")


# --- security ----------------------------------------------------------------------------------------------


def test_decoy_safetensors_beside_a_pickle_is_refused(capsys, tmp_path, monkeypatch):
    """An empty ``decoy.safetensors`` is not what diffusers loads: the pickle beside it is, so it is refused."""
    from chaintune.testing import tiny_unet_model

    monkeypatch.chdir(tmp_path)
    tiny_unet_model().save(tmp_path / "m")
    unet = tmp_path / "m" / "unet"
    from diffusers import UNet2DModel

    UNet2DModel.from_pretrained(unet).save_pretrained(unet, safe_serialization=False)
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "decoy.safetensors").write_bytes(b"")
    args = ["sample", "--model", "m", "--num", "1", "--steps", "2", "--out", "s"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line_error(code, err, "unet/", "diffusion_pytorch_model.bin", "pickled", "--allow-pickle")
    assert not (tmp_path / "s").exists()
    code, _, err = run_cli(capsys, *args, "--allow-pickle")  # the opt-in loads the file that was refused
    assert code == 0, err


def test_a_config_from_a_run_needs_trust_code_however_it_arrives(capsys, tmp_path, monkeypatch):
    """--config r/config.yaml (with or without --resume, or through a link) names code: --trust-code is needed."""
    (tmp_path / "runreward.py").write_text("def r(images, **kw):\n    return images.flatten(1).mean(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "align", "--reward", "runreward:r", "--estimator", "reinforce", "--save-every", "1",
                           "--out", "r", *TINY)
    assert code == 0, err
    (tmp_path / "link.yaml").symlink_to(tmp_path / "r" / "config.yaml")
    (tmp_path / "r" / "sub").mkdir()
    (tmp_path / "r" / "sub" / "c.yaml").write_text((tmp_path / "r" / "config.yaml").read_text())
    for args in (["--out", "r", "--resume", "--config", "r/config.yaml", "--steps", "2"],
                 ["--out", "r2", "--config", "r/config.yaml"],
                 ["--out", "r2", "--config", "link.yaml"],
                 ["--out", "r2", "--config", "r/sub/c.yaml"]):
        before = snapshot(tmp_path)
        code, _, err = run_cli(capsys, "align", *args)
        assert code == 2, (args, err)
        assert_one_line_error(code, err, "runreward:r", "--trust-code")
        assert_nothing_lost(before, tmp_path)
        assert not (tmp_path / "r2").exists()
    code, _, err = run_cli(capsys, "align", "--out", "r", "--resume", "--config", "r/config.yaml", "--steps", "2",
                           "--trust-code")
    assert code == 0, err
    # the user's own choice on the command line is not a saved config's
    code, _, err = run_cli(capsys, "align", "--config", "r/config.yaml", "--reward", "digit:3", "--out", "r3")
    assert code == 0, err


# --- sample: the run lock, and the plan's suggestion -----------------------------------------------------------


def test_sample_takes_the_lock_on_its_out(capsys, user_files):
    """A second writer into one --out is refused with the holder's pid, and writes nothing."""
    import os

    from chaintune.run.rundir import RunLock

    lock = RunLock(user_files / "out").acquire()  # another sampler, as an flock on the folder
    try:
        before = snapshot(user_files)
        code, _, err = run_cli(capsys, *SAMPLE)
        assert code == 2
        assert_one_line_error(code, err, "out", "another chaintune process", f"pid {os.getpid()}")
        assert_nothing_lost(before, user_files)
        assert not list((user_files / "out").glob("sample_*"))
    finally:
        lock.release()
    code, _, err = run_cli(capsys, *SAMPLE)
    assert code == 0, err


def test_two_sample_processes_into_one_out_do_not_both_write(tmp_path):
    """Two real ``chaintune sample`` processes into one --out: one writes, the other stops with one error line."""
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", CHAINTUNE_THREADS="1", CHAINTUNE_CACHE=str(tmp_path / ".cache"))
    cmd = [sys.executable, "-m", "chaintune.cli.main", "sample", "--num", "64", "--steps", "50", "--out", "same"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    line = _error_line(next(e for code, e in results if code == 2))
    # refused by the lock while the other wrote, or (if it came after) by the other's finished outputs
    assert line.startswith("error:") and ("another chaintune process" in line or "already exists" in line), line
    assert len(list((tmp_path / "same").glob("sample_*.png"))) == 64


def test_plan_suggests_the_configuration_it_measured(capsys, tmp_path, monkeypatch):
    """Pasted into align, the suggested flags give the run whose memory was measured, at the h reported."""
    import shlex

    import typer

    from chaintune.cli.main import app
    from chaintune.plan.memory import MemoryPlan, format_plan, suggested_flags

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "plan", "--sample-steps", "50", "--batch-size", "2")
    assert code == 0, err
    rows = {line[:21].strip(): line[21:].strip() for line in out.splitlines() if line.strip()}  # "label  value"
    flags = shlex.split(rows["suggested flags"])
    align = typer.main.get_command(app).commands["align"]
    params = align.make_context("align", flags).params
    assert params["estimator"] == "rlr" and params["h"] == int(rows["h*"].split()[0])
    assert params["sample_steps"] == 50 and params["batch_size"] == 2 and params["peft"] == "lora"
    assert params["gradient_checkpointing"] is (rows["gradient ckpt"] == "yes")
    # what differs from align's defaults is always said: the model, a device asked for, checkpointing off
    plan = MemoryPlan(device="cpu", budget=1, fixed=0, b_h=1, b_z=1, steps=50, batch_size=1, h_star=49, fits=True,
                      max_batch_h2=1, checkpointing=False, model="runs/x", peft="lora", requested_device="cpu")
    params = align.make_context("align", suggested_flags(plan)).params
    assert (params["model"], params["device"], params["h"], params["gradient_checkpointing"]) == \
        ("runs/x", "cpu", 49, False)
    assert "--h 49" in format_plan(plan)
