"""revengine.memory: measure_step, measure_in_subprocess, breakdown."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from revengine import memory

THIS = os.path.abspath(__file__)


def _quiet_measure(fn, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # this process may lack MALLOC_MMAP_THRESHOLD_
        return memory.measure_step(fn, **kw)


def test_measure_step_sees_a_big_allocation():
    def step():
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return float(t[-1])

    fig = _quiet_measure(step, warmup=1)
    assert isinstance(fig, memory.MemoryFigure)
    assert 56 <= fig.peak_delta_mb <= 80, fig
    assert fig.seconds > 0 and fig.device == "cpu" and fig.result == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_measure_step_on_cuda_sees_the_peak_not_the_kept_result():
    keep = torch.zeros(8 * 2**20 // 4, device="cuda")  # allocated before: not counted

    def step():
        t = torch.ones(64 * 2**20 // 4, device="cuda")  # 64 MiB, freed before the end
        return float(t.sum()) + float(keep.sum())

    fig = memory.measure_step(step, warmup=1, device="cuda")
    assert fig.device.startswith("cuda") and fig.method == "cuda-max-allocated" and fig.reliable
    assert 63 <= fig.peak_delta_mb <= 66, fig
    assert fig.result == 64 * 2**20 // 4


def test_measure_step_rejects_other_devices():
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        memory.measure_step(lambda: None, device="meta")


def test_measure_step_is_zero_without_allocation():
    fig = _quiet_measure(lambda: sum(range(1000)))
    assert 0 <= fig.peak_delta_mb < 2, fig
    assert fig.result == sum(range(1000))


def test_measure_step_flags_the_allocator_setting():
    ok = os.environ.get("MALLOC_MMAP_THRESHOLD_") == memory.MMAP_THRESHOLD
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = memory.measure_step(lambda: None)
    assert fig.reliable == (ok and fig.method == "vmhwm-reset")
    assert any("MALLOC_MMAP_THRESHOLD_" in str(w.message) for w in caught) == (not ok)


def child_step(mb, tag):
    """Runs in the child of measure_in_subprocess."""
    def step():
        t = torch.ones(mb * 2**20 // 4)
        return float(t.sum())

    fig = memory.measure_step(step, warmup=1)
    return {"figure": fig, "tag": tag, "pid": os.getpid(), "env": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


def child_fails():
    raise ValueError("boom from the child")


def test_measure_in_subprocess_runs_a_fresh_process():
    out = memory.measure_in_subprocess(f"{THIS}:child_step", {"mb": 32, "tag": "x"})
    assert out["tag"] == "x" and out["pid"] != os.getpid()
    assert out["env"] == memory.MMAP_THRESHOLD
    fig = out["figure"]
    assert fig["reliable"] is True, fig
    assert 28 <= fig["peak_delta_mb"] <= 40, fig  # warm-up had the same peak: the reset makes it visible


def test_measure_in_subprocess_env_none_removes_a_variable():
    out = memory.measure_in_subprocess(f"{THIS}:child_step", {"mb": 1, "tag": "y"}, env={"MALLOC_MMAP_THRESHOLD_": None})
    assert out["env"] is None and out["tag"] == "y"


def test_measure_in_subprocess_reports_child_errors(tmp_path):
    (tmp_path / "failing_target.py").write_text("def boom():\n    raise ValueError('boom from the child')\n")
    with pytest.raises(RuntimeError, match="boom from the child") as info:
        memory.measure_in_subprocess(f"{tmp_path / 'failing_target.py'}:boom", {})
    assert "failing_target.py:boom" in str(info.value) and "ValueError" in str(info.value)
    with pytest.raises(RuntimeError, match="no_such_function"):
        memory.measure_in_subprocess("json:no_such_function", {})
    with pytest.raises(ValueError):
        memory.measure_in_subprocess("no colon", {})


def test_breakdown_counts_weights_grads_and_optimizer_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.Linear(20, 3, dtype=torch.float64))
    model[0].extra = model[2].weight  # a shared tensor is counted once
    f32 = (10 * 20 + 20) + (20 + 20)
    f64 = 20 * 3 + 3
    weights = 4 * f32 + 8 * f64
    buffers = 4 * 20 * 2 + 8  # running mean/var + num_batches_tracked (int64)

    b = memory.breakdown(model)
    assert b["params"] == f32 + f64
    assert b["weights_bytes"] == weights and b["grads_bytes"] == 0 and b["optimizer_state_bytes"] == 0
    assert b["buffers_bytes"] == buffers
    assert b["weights_mb"] == weights / 2**20

    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(8, 10)
    model[2](model[1](model[0](x)).double()).sum().backward()
    opt.step()
    b = memory.breakdown(model, opt)
    n_tensors = len(list(model.parameters()))
    assert b["grads_bytes"] == weights
    # Adam: exp_avg and exp_avg_sq like each parameter, plus one float32 `step` scalar per parameter
    assert b["optimizer_state_bytes"] == 2 * weights + 4 * n_tensors
    assert b["total_bytes"] == weights + weights + buffers + 2 * weights + 4 * n_tensors
    assert b["total_mb"] == pytest.approx(b["total_bytes"] / 2**20)


def child_training_step(hidden, full_step):
    """Runs in a fresh process: a model whose forward keeps a known activation alive."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(2048, 256)
    r = memory.training_step_figures(model, opt, lambda: model(x).square().mean(), full_step=full_step)
    return {k: v for k, v in r.items() if not k.startswith("figure")}


@pytest.mark.parametrize("full_step", [True, False])
def test_training_step_figures_break_a_step_down(full_step):
    r = memory.measure_in_subprocess(f"{THIS}:child_training_step", {"hidden": 2048, "full_step": full_step},
                                     env={"OMP_NUM_THREADS": "1"})
    weights = (256 * 2048 + 2048 + 2048 + 1) * 4 / 2**20
    assert r["weights_mb"] == pytest.approx(weights) and r["optimizer_state_mb"] == pytest.approx(2 * weights, rel=1e-3)
    assert r["grads_mb"] == pytest.approx(weights)  # allocated (zeroed) when the activations were measured
    # [2048, 2048] fp32 blocks of 16 MiB: the hidden and its ReLU in forward, their grads in backward
    assert 32 <= r["activations_mb"] <= 72, r
    if full_step:
        assert r["steady_peak_mb"] == pytest.approx(r["weights_mb"] + r["optimizer_state_mb"] + r["step_delta_mb"])
        assert r["step_delta_mb"] >= r["activations_mb"] - 2  # the full step allocates the grads as well
    else:
        assert r["step_delta_mb"] is None


def test_time_alternating_rotates_the_steps_after_warm_up():
    calls = []
    steps = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = memory.time_alternating(steps, 3, warmup=1)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"  # warm-up, then no step always runs first
    assert set(times) == set("abc") and all(len(v) == 3 and min(v) >= 0 for v in times.values())
    memory.synchronize("cpu")  # nothing to wait for


def test_importing_revengine_bounds_onednn_caches_unless_the_user_chose(tmp_path):
    """bfloat16 matmuls on CPU go through oneDNN, whose caches grow with an MoE's per-expert shapes: importing
    revengine sets their capacities, and leaves a value the user set alone."""
    code = "import os, revengine; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    # cwd: away from a checkout, whose revengine/ (without the built extension) would shadow the installed one
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    assert out.split() == ["64", "64"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "LRU_CACHE_CAPACITY": "7"}, capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout
    assert out.split() == ["64", "7"]
