"""Loading the C++ extension: a missing or stale build is a clear ImportError, never a fallback."""
import os
import subprocess
import sys
import tempfile
import textwrap

import revengine
from conftest import PKG_ROOT


def run_python(code: str) -> subprocess.CompletedProcess:
    # Import the same revengine the tests use (installed, or the in-place build) and nothing else
    # from PYTHONPATH, not whatever the current directory holds.
    env = dict(os.environ, PYTHONPATH=PKG_ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=tempfile.gettempdir(), env=env)


def test_extension_loads_and_registers_ops():
    import torch

    assert revengine._ext._C.SOURCE_HASH.startswith("h")
    assert hasattr(torch.ops.revengine, "coupling_update_")


def test_missing_extension_is_a_clear_import_error():
    proc = run_python(
        """
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "revengine._C":
                    raise ImportError("simulated: no compiled module")
        sys.meta_path.insert(0, Block())
        try:
            import revengine
        except ImportError as e:
            print("ERR", e)
        """
    )
    assert "ERR revengine's C++ extension revengine._C could not be loaded" in proc.stdout, proc.stderr
    assert "--no-build-isolation" in proc.stdout


def test_stale_extension_is_a_clear_import_error():
    proc = run_python(
        """
        import sys, types
        # A build record that does not match the compiled module (as after editing csrc/).
        info = types.ModuleType("revengine._build_info")
        info.SOURCE_HASH = "hdeadbeef"
        sys.modules["revengine._build_info"] = info
        try:
            import revengine
        except ImportError as e:
            print("ERR", e)
        """
    )
    assert "ERR revengine's C++ extension is stale" in proc.stdout, proc.stderr
