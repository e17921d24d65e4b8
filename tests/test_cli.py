"""The `revengine` command line."""
import os
import subprocess
import sys

import pytest

from conftest import PKG_ROOT, child_env
from revengine.apps import cli


def run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "revengine", *args], cwd=PKG_ROOT, env=child_env(),
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize("command", [["demo", "--toy", "--quick"], ["breakdown", "--model", "."]], ids=["demo", "breakdown"])
def test_device_cuda(command):
    import torch

    proc = run_cli(*command, "--device", "cuda")
    if torch.cuda.is_available() and command[0] == "demo":
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "on cuda" in proc.stdout and "peak allocated GPU memory" in proc.stdout
    elif torch.cuda.is_available():  # the device is accepted; "." is no model
        assert proc.returncode == 2 and "no config.json" in proc.stderr, proc.stderr[-3000:]
    else:  # a usage error naming the missing GPU, before any work
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "argument --device: 'cuda' needs a CUDA device" in proc.stderr


def test_help(capsys):
    # what the `revengine` console script (revengine.apps.cli:main) does with --help
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


LOWBIT = ["--scheme", "bdia", "--optimizer", "adamw8bit", "--weights", "bf16", "--in-backward"]


@pytest.mark.parametrize("extra", [["--scheme", "none", "--gradient-checkpointing"], ["--scheme", "leapfrog"],
                                   ["--scheme", "revffn", "--optimizer", "adamw-in-backward"], LOWBIT],
                         ids=["hf-ckpt", "converted", "converted-in-backward", "8bit-bf16-in-backward"])
def test_breakdown(tmp_path, capsys, extra):
    tf = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    if extra is LOWBIT:
        pytest.importorskip("torchao")
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=4000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=24,
                           experts_implementation="eager")
    tf.MixtralForCausalLM(cfg).save_pretrained(str(tmp_path / "m"))
    rc = cli.main(["breakdown", "--model", str(tmp_path / "m"), "--batch", "2", "--seq", "32", "--threads", "1", *extra])
    out = capsys.readouterr().out
    assert rc == 0, out
    values = {}
    for line in out.splitlines()[1:7]:
        name, value = line.rsplit(None, 1)
        values[name.strip()] = float(value)
    assert set(values) == {"weights", "optimizer state", "grads", "activations (layers)", "logits (LM head + loss)",
                           "steady-state peak"}, out
    in_backward = "adamw-in-backward" in extra or "--in-backward" in extra
    assert (values["grads"] == 0.0) == in_backward
    assert values["steady-state peak"] >= values["weights"] + values["optimizer state"]
    bpp = [line for line in out.splitlines() if "bytes per parameter" in line]
    assert len(bpp) == 1, out
    if extra is LOWBIT:  # bf16 weights (2 B) + 8-bit moments (2 x ~1 B; small tensors stay bf16)
        assert "weights 2.00" in bpp[0] and values["optimizer state"] < 0.7 * values["weights"] * 2, out
    else:
        assert values["optimizer state"] == pytest.approx(2 * values["weights"], rel=0.05)
        assert "weights 4.00 + optimizer state 8.00 = 12.00" in bpp[0], out


def test_breakdown_without_torchao_is_one_line(tmp_path, capsys, monkeypatch):
    from revengine.apps import breakdown
    monkeypatch.setattr(breakdown, "torchao_available", lambda: False)
    assert cli.main(["breakdown", "--model", str(tmp_path), "--optimizer", "adamw4bit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--optimizer adamw4bit needs torchao" in err and "pip install" in err


def test_breakdown_bad_model(tmp_path, capsys):
    assert cli.main(["breakdown", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
