"""Hash of the C++/CUDA sources (csrc/*.* then csrc/cuda/*.*), shared by setup.py and the import check.

Imports nothing from revengine or torch, so setup.py can load it by path before anything is built.
"""
import glob
import hashlib
import os


def source_hash(csrc: str) -> str:
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(csrc, "*.*"))) + sorted(glob.glob(os.path.join(csrc, "cuda", "*.*"))):
        h.update(os.path.relpath(path, csrc).replace(os.sep, "/").encode())
        with open(path, "rb") as fh:
            h.update(fh.read())
    return "h" + h.hexdigest()[:16]
