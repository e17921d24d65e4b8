"""The examples run and learn: a plain training loop (with and without AdamW inside backward) and
HF Trainer on a converted model. (examples/cpp_trainer.cpp is built by CMake and run by ctest.)"""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("flags", [[], ["--in-backward"], ["--block-type", "revffn"]], ids=["adamw", "in-backward", "revffn"])
def test_train_loop(flags):
    start, end = load("train_loop").main(["--steps", "30", *flags])
    assert end < start - 1.5


def test_hf_trainer(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    start, end = load("hf_trainer").main(["--steps", "20", "--out", str(tmp_path)])
    assert end < start - 1.5


def test_cpp_trainer_is_built_by_cmake():
    text = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    assert "add_executable(cpp_trainer examples/cpp_trainer.cpp)" in text and "add_test(NAME cpp_trainer" in text
