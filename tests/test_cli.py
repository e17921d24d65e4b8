"""The `revengine` command line."""
import os
import subprocess
import sys

import pytest

import revengine
from revengine import cli

# The subprocesses import the same revengine as these tests.
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(revengine.__file__)))


def run_cli(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PKG_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run(
        [sys.executable, "-m", "revengine", *args], cwd=PKG_ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def test_demo_quick():
    proc = run_cli("demo", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "before training" in out and "held-out" in out
    table = out[out.index("mode "):]
    for mode in ("plain", "checkpoint", "reversible"):
        assert any(line.startswith(mode) and line.count("|") == 4 for line in table.splitlines()), table


def test_help(capsys):
    # what the `revengine` console script (revengine.cli:main) does with --help
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--help"])
    assert info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_unknown_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code != 0
    assert "invalid choice" in capsys.readouterr().err


def test_no_subcommand(capsys):
    assert cli.main([]) != 0
    assert "command is required" in capsys.readouterr().err
