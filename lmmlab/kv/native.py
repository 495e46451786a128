"""The packed-KV attention kernels in C (`lmmlab/csrc/kivi_attention.c`), built once per machine with the system's C
compiler and loaded with ctypes.

The library is compiled for the CPU it runs on (`-march=native`) and linked against OpenMP, which resolves to the
OpenMP runtime torch has already loaded, so the kernels and torch share one thread pool. It lands in
$LMMLAB_CACHE/kernels under a name that hashes the source, the flags, the compiler and the CPU, written atomically
(a killed build leaves nothing that looks complete), under a lock: processes that need it at once (test workers, search
workers) build it once, the others wait for it. No compiler, or a failed build, gives `None` and the caller
falls back to torch (`lmmlab.attention`), with one warning naming the reason. `load_library` builds and loads any
other C file the same way (the sparse linears' kernels, `lmmlab/models/csrc/sparse_matvec.c`, use it).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from lmmlab.files import atomic_file, build_once, cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "kivi_attention.c"
HEADER = Path(__file__).parent / "csrc" / "half.h"  # included by every kernel source
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-std=gnu11",
         # float sums may be reassociated (vectorized dot products): results equal the torch path to float rounding
         "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast")


def _cpu_flags() -> str:
    """What `-march=native` compiles for: the CPU's feature flags (x86 `flags`, Arm `Features` and `CPU part`)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keys = ("flags", "Features", "CPU implementer", "CPU part")
    seen = sorted({line.split(":", 1)[-1].strip() for line in lines if line.split(":", 1)[0].strip() in keys})
    return "|".join([platform.machine(), platform.processor(), *seen])


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def library_path(compiler: str, source: Path = SOURCE) -> Path:
    """Where the library built from `source` lives: named by the source's stem and a hash of the source, the flags,
    the compiler's version and the CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    text = [source.read_text(), HEADER.read_text()]  # the kernels' shared header is part of every build
    digest = hashlib.sha256("\0".join([*text, *FLAGS, *version, _cpu_flags()]).encode()).hexdigest()
    return cache_dir() / "kernels" / f"{source.stem}-{digest[:16]}.so"


def build(compiler: str, out: Path, source: Path = SOURCE) -> None:
    """Compile `source` into `out` (atomically); raises RuntimeError with the compiler's message."""
    with atomic_file(out, suffix=".so") as tmp:
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed on {source.name}: {done.stderr.strip()[:500]}")
        os.chmod(tmp, 0o755)  # mkstemp makes it 0600: others sharing the cache load it too


def load_library(source: Path, what: str) -> ctypes.CDLL | None:
    """The library built from the C file `source` (compiled into the cache on first use, then loaded from there);
    None where it cannot be built or loaded, with one warning saying that `what` runs in torch, and why."""
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found (set CC): %s runs in torch, slower", what)
        return None
    try:
        def make(path: Path) -> None:
            log.info("building the %s kernels: %s", what, path)
            build(compiler, path, source)

        path = build_once(library_path(compiler, source), is_current=Path.exists, build=make)
        return ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("%s kernels unavailable (%s): running in torch, slower", what, err)
        return None


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None (with one warning) where it cannot be built."""
    lib = load_library(SOURCE, "packed KV attention")
    if lib is None:
        return None
    args = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6 + [ctypes.c_long] * 2 + [ctypes.c_int] * 2
    for fn in (lib.kivi_scores, lib.kivi_values):
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib
