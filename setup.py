"""Builds revengine and its C++ extension revengine._C against the installed torch.

Install with `pip install --no-build-isolation .` after `pip install torch==2.13.0`
(see README): build isolation would pull a multi-GB CUDA torch into the build environment.
"""
import glob
import hashlib
import os

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # pragma: no cover - only hit on a broken build environment
    raise SystemExit(
        "revengine builds a C++ extension against torch: install torch first "
        "(pip install torch==2.13.0) and build with pip install --no-build-isolation ."
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(glob.glob(os.path.join("csrc", "*.cpp")))


def source_hash() -> str:
    """Hash of every C++ source and header: baked into the extension so that a stale build is caught."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(HERE, "csrc", "*.*"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as fh:
            h.update(fh.read())
    return "h" + h.hexdigest()[:16]


def write_build_info(digest: str) -> None:
    import torch

    text = (
        "# Written by setup.py at build time; compared with the extension at import.\n"
        f"SOURCE_HASH = {digest!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
    )
    path = os.path.join(HERE, "revengine", "_build_info.py")
    with open(path, "w") as fh:
        fh.write(text)


def write_hash_header(digest: str) -> str:
    """Only python.cpp includes this header, so a new hash recompiles one file, not all of them."""
    folder = os.path.join(HERE, "build", "generated")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "revengine_source_hash.h")
    text = f'#pragma once\n#define REVENGINE_SOURCE_HASH "{digest}"\n'
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as fh:
            fh.write(text)
    return folder


digest = source_hash()
write_build_info(digest)
generated = write_hash_header(digest)

# -g0: no debug info (it triples compile time and the size of the module).
extra_cflags = ["-O3", "-g0", "-fopenmp", "-DREVENGINE_HAVE_HASH_HEADER"]

setup(
    ext_modules=[
        CppExtension(
            "revengine._C",
            SOURCES,
            include_dirs=[os.path.join(HERE, "csrc"), generated],
            extra_compile_args={"cxx": extra_cflags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
