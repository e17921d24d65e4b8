"""Builds revengine and its C++ extension revengine._C against the installed torch.

Install with `pip install --no-build-isolation .` after `pip install torch==2.13.0`
(see README): build isolation would pull a multi-GB CUDA torch into the build environment.
With a CUDA torch and the CUDA toolkit (CUDA_HOME), the CUDA kernels in csrc/cuda/ are built in
too (architectures from TORCH_CUDA_ARCH_LIST); otherwise the extension is CPU-only.
"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only hit on a broken build environment
    raise SystemExit(
        "revengine builds a C++ extension against torch: install torch first "
        "(pip install torch==2.13.0) and build with pip install --no-build-isolation ."
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
# The CUDA kernels (torch-free .cu) and their torch glue (.cpp): built only with a CUDA torch and nvcc.
CUDA_SOURCES = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
WITH_CUDA = bool(torch.version.cuda) and CUDA_HOME is not None
# torch guesses CUDA_HOME from nvcc's folder; a wrapper script (e.g. /usr/local/bin/nvcc) gives a
# folder without the toolkit: then CUDA_HOME must be set to the toolkit root.
CUDA_HOME_BAD = WITH_CUDA and not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))


def source_hash() -> str:
    """Hash of every C++/CUDA source and header: baked into the extension so that a stale build is caught."""
    spec = importlib.util.spec_from_file_location("_revengine_source_hash", os.path.join(HERE, "revengine", "_source_hash.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # by path: revengine itself cannot be imported before it is built
    return module.source_hash(os.path.join(HERE, "csrc"))


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
extra_ldflags = ["-fopenmp"]


def links_shared_libstdcxx(cxx: str):
    """Whether `cxx` links a shared library against the shared libstdc++ (True / False), or None when
    the probe cannot tell (no such compiler, not Linux, no readelf)."""
    readelf = shutil.which("readelf")
    if not sys.platform.startswith("linux") or readelf is None or shutil.which(cxx.split()[0]) is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        src, lib = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as fh:
            fh.write("#include <sstream>\nstd::string probe(unsigned long x) { std::ostringstream s; s << x; return s.str(); }\n")
        try:
            subprocess.run(cxx.split() + ["-shared", "-fPIC", src, "-o", lib], check=True, capture_output=True, timeout=120)
            needed = subprocess.run([readelf, "-d", lib], check=True, capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    return "libstdc++.so" in needed


def choose_compiler() -> None:
    """torch's libraries use the shared libstdc++. A compiler that links it statically (some toolchains
    under /opt do) gives the extension a second copy whose locale facet ids disagree with torch's: the
    first formatted message (std::ostringstream << number) then crashes. Such a compiler is replaced by
    the first of the system's that links it shared, with a printed line; with none, the build stops."""
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if links_shared_libstdcxx(cxx) is not False:
        return
    for alt in (sysconfig.get_config_var("CXX"), "/usr/bin/g++", "/usr/bin/c++"):
        if alt and alt != cxx and links_shared_libstdcxx(alt):
            cc = alt.replace("g++", "gcc") if "g++" in alt else alt.replace("c++", "cc")
            print(f"revengine: {cxx} links libstdc++ statically, beside torch's shared one (the extension would "
                  f"crash); building with {alt} instead")
            os.environ["CXX"] = alt
            if shutil.which(cc.split()[0]):
                os.environ["CC"] = cc
            return
    raise SystemExit(f"revengine: {cxx} links libstdc++ statically, beside torch's shared one (the extension would "
                     "crash at its first message); set CXX (and CC) to a compiler that links it shared, "
                     "e.g. the system's g++")


choose_compiler()

if WITH_CUDA and not CUDA_HOME_BAD:
    # Architectures: TORCH_CUDA_ARCH_LIST (e.g. "9.0"), else torch's default for the build machine.
    # No -ftz / --use_fast_math: the kernels must round like the CPU ones (see coupling_kernels.cu).
    extension = CUDAExtension(
        "revengine._C",
        SOURCES + CUDA_SOURCES,
        include_dirs=[os.path.join(HERE, "csrc"), generated],
        extra_compile_args={"cxx": extra_cflags, "nvcc": ["-O3"]},
        extra_link_args=extra_ldflags,
    )
else:
    if CUDA_HOME_BAD:
        print(f"revengine: building without CUDA kernels (CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h: "
              "set CUDA_HOME to the CUDA toolkit root)")
    else:
        print("revengine: building without CUDA kernels (no CUDA torch / nvcc found)")
    extension = CppExtension(
        "revengine._C",
        SOURCES,
        include_dirs=[os.path.join(HERE, "csrc"), generated],
        extra_compile_args={"cxx": extra_cflags},
        extra_link_args=extra_ldflags,
    )

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
