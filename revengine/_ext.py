"""Loads the C++ extension, failing loudly when it is missing or stale (never a Python fallback)."""
import os

import torch

from ._source_hash import source_hash

_REBUILD = (
    "Rebuild it from the source tree: `pip install torch==2.13.0 && "
    "pip install --no-build-isolation .` (in a checkout: `pip install --no-build-isolation -e .`)."
)

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # missing, or built against another torch
    raise ImportError(f"revengine's C++ extension revengine._C could not be loaded ({exc}). {_REBUILD}") from exc

try:
    from . import _build_info
except ImportError as exc:
    raise ImportError(f"revengine/_build_info.py is missing: the package was not built by setup.py. {_REBUILD}") from exc


def _check() -> None:
    if _C.SOURCE_HASH != _build_info.SOURCE_HASH:
        raise ImportError(
            f"revengine's C++ extension is stale: it was built from sources {_C.SOURCE_HASH}, "
            f"the Python package expects {_build_info.SOURCE_HASH}. {_REBUILD}"
        )
    built_for = _C.TORCH_VERSION
    running = torch.__version__.split("+")[0]
    if built_for != running:
        raise ImportError(
            f"revengine's C++ extension was built against torch {built_for} but torch {running} is installed. {_REBUILD}"
        )
    # In a source checkout, csrc/ sits beside the package: catch edits that were not rebuilt.
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    if os.path.isdir(csrc) and os.path.exists(os.path.join(os.path.dirname(csrc), "setup.py")):
        current = source_hash(csrc)
        if current != _C.SOURCE_HASH:
            raise ImportError(
                f"revengine's C++ extension is stale: csrc/ changed since it was built "
                f"(built {_C.SOURCE_HASH}, now {current}). {_REBUILD}"
            )


_check()
