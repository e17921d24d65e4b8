"""`revengine selftest`: passes on CPU, and names a broken kernel (exit status 1, with the hint)."""
import json

import torch

from revengine.apps import cli, selftest

from conftest import child_env, run_python


def test_selftest_passes_on_cpu(capsys):
    assert cli.main(["selftest"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "hint" not in out
    for name in ("op:coupling_update", "op:moe_scatter_combine_backward", "model:bdia", "exact", "offload"):
        assert name in out
    stream = [line for line in out.splitlines() if line.startswith("stream ")]
    assert len(stream) == 1 and stream[0].split()[1:4] == ["0", "0", "pass"], out  # the test extra has transformers


def test_broken_kernel_fails_naming_the_op(monkeypatch, capsys):
    real = selftest._custom

    def custom(name):
        fn = real(name)
        if name != "coupling_update":
            return fn

        def perturbed(x, f, lam):  # a wrong kernel: one ulp off somewhere
            out = fn(x, f, lam)
            if out.numel():
                out.view(-1)[out.numel() // 2] = torch.nextafter(out.view(-1)[out.numel() // 2],
                                                                 torch.tensor(float("inf"), dtype=out.dtype))
            return out
        return perturbed

    monkeypatch.setattr(selftest, "_custom", custom)
    assert cli.main(["selftest", "--json"]) == 1
    captured = capsys.readouterr()
    rows = {r["name"]: r for r in json.loads(captured.out)}
    assert not rows["op:coupling_update"]["passed"]
    assert [n for n, r in rows.items() if not r["passed"]] == ["op:coupling_update"]
    assert "REVENGINE_KERNELS=aten" in captured.err and "coupling_update" in captured.err


def test_selftest_subprocess_with_aten_kernels_selected():
    """The op rows still test the custom kernels; the model rows run on the references."""
    out = run_python(["-m", "revengine", "selftest"], env=child_env(REVENGINE_KERNELS="aten"), timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kernels: aten" in out.stdout


def test_bad_device_is_a_usage_error(capsys):
    try:
        cli.main(["selftest", "--device", "tpu"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("expected a usage error")
