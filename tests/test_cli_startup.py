"""The CLI starts fast (no torch/diffusers at import), prints full help in a pipe, and picks a thread count."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft")
ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # a pipe, not a terminal
    exe = shutil.which("chaintune")
    cmd = [exe] if exe else [sys.executable, "-m", "chaintune.cli.main"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)


def test_cli_import_loads_no_heavy_library():
    p = _python(f"import chaintune.cli.main, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", f"imported at CLI start-up: {p.stdout.strip()}"


def test_package_import_is_lazy_and_the_api_still_works():
    p = _python(f"import chaintune, sys\nassert not [m for m in {HEAVY!r} if m in sys.modules]\n"
                "from chaintune import sample\n"
                "print(chaintune.load.__module__, sample.__module__, chaintune.Trajectory.__name__, "
                "sorted(chaintune.__all__) == sorted(set(chaintune.__all__) & set(dir(chaintune))))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["chaintune.backends", "chaintune.sampling", "Trajectory", "True"]


def test_unknown_attribute():
    import chaintune

    with pytest.raises(AttributeError):
        chaintune.no_such_thing  # noqa: B018


def test_help_exits_0():
    p = _cli("--help")
    assert p.returncode == 0, p.stderr
    assert "Commands:" in p.stdout and "sample" in p.stdout
    commands = p.stdout.split("Commands:")[1]
    assert "..." not in commands and "…" not in commands  # whole first sentences in the command list


def test_sample_help_in_a_pipe_is_complete():
    p = _cli("sample", "--help")
    assert p.returncode == 0, p.stderr
    assert "…" not in p.stdout
    assert "--batch-size" in p.stdout and "--allow-pickle" in p.stdout
    assert "[default: builtin:digits]" in " ".join(p.stdout.split())
    assert "-h, --help" in p.stdout


def test_every_command_help_shows_defaults(capsys):
    from chaintune.cli.main import app, main

    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        with pytest.raises(SystemExit) as e:
            main([name, "-h"])
            raise SystemExit(0)
        assert e.value.code in (0, None)
        out = capsys.readouterr().out
        assert "…" not in out, name
        assert f"chaintune {name}" in out
        if "--" in out.split("Options:")[-1].replace("--help", ""):
            assert "[default:" in out or "[required]" in out, f"{name}: no defaults shown\n{out}"


# --------------------------------------------------------------------------------------------------
# thread policy (chaintune.utils.threads)

def test_choose_threads(monkeypatch):
    from chaintune.utils import threads

    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(threads, "_busy_cores", lambda: 0)
    assert threads.choose_threads(1_100_000) == 1  # builtin:digits
    assert threads.choose_threads(50_000_000) == 8
    monkeypatch.setattr(threads, "_busy_cores", lambda: 3)
    assert threads.choose_threads(50_000_000) == 5
    monkeypatch.setattr(threads, "_busy_cores", lambda: 20)
    assert threads.choose_threads(50_000_000) == 1


def test_apply_thread_policy_honours_the_variable(monkeypatch):
    import torch

    from chaintune.utils.threads import apply_thread_policy

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("CHAINTUNE_THREADS", "2")
        assert apply_thread_policy(1000) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("CHAINTUNE_THREADS", "auto")
        assert apply_thread_policy(torch.nn.Linear(4, 4)) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("CHAINTUNE_THREADS", "lots")
        from chaintune.errors import ChaintuneError

        with pytest.raises(ChaintuneError, match="CHAINTUNE_THREADS"):
            apply_thread_policy(1000)
    finally:
        torch.set_num_threads(before)
