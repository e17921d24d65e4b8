"""The package's layering: core < models < conversion < applications, one way only.

`lint-imports` (import-linter, the contract in pyproject.toml) reads the package as it is
installed, where models/ is revengine/models; a copy of that layout is linted, so the check is the
same in a source checkout (an editable install maps models/ in place) and in an installed tree.
"""
import os
import shutil
import subprocess
import sys

import pytest

import revengine
import revengine.models
from conftest import child_env, run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("importlinter")


def _layout(tmp_path):
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.pyc")
    pkg = tmp_path / "revengine"
    shutil.copytree(os.path.dirname(revengine.__file__), pkg, ignore=ignore)
    if not (pkg / "models").exists():
        shutil.copytree(os.path.dirname(revengine.models.__file__), pkg / "models", ignore=ignore)
    return pkg


def _lint(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    env = child_env()
    env["PYTHONPATH"] = str(tmp_path)  # the copy, not the package under test
    return subprocess.run([exe, os.path.join(ROOT, "pyproject.toml"), "--no-cache"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_layers_contract_holds(tmp_path):
    _layout(tmp_path)
    r = _lint(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout


def _lint_with(tmp_path, edit):
    """lint-imports on the installed layout after `edit(package_folder)`: it must fail."""
    edit(_layout(tmp_path))
    r = _lint(tmp_path)
    assert r.returncode != 0, r.stdout
    return r.stdout


def test_layers_contract_catches_a_core_module_importing_models(tmp_path):
    def core_imports_models(pkg):
        with open(pkg / "couplings.py", "a") as fh:
            fh.write("\nimport revengine.models  # noqa\n")

    assert "revengine.couplings -> revengine.models" in _lint_with(tmp_path, core_imports_models)


def test_layers_contract_catches_an_undeclared_module(tmp_path):
    assert "stray" in _lint_with(tmp_path, lambda pkg: (pkg / "stray.py").write_text("x = 1\n"))


def _python(code):
    """Runs `code` in a fresh interpreter that imports the revengine under test; returns its stdout."""
    r = run_python(["-c", code])
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_import_revengine_loads_no_models_transformers_or_hypothesis():
    _python("import revengine, sys; bad = {'revengine.models', 'transformers', 'hypothesis'} & set(sys.modules); "
            "assert not bad, bad")


def test_strategies_without_hypothesis_is_a_clear_import_error():
    out = _python("import sys; sys.modules['hypothesis'] = None\nimport revengine\n"
                  "try:\n    revengine.testing.strategies\nexcept ImportError as e:\n    print(e)\n")
    assert "revengine.testing.strategies needs hypothesis" in out
