"""Transparent huge pages for XLA's buffers on Linux, set before the process starts.

XLA:CPU allocates each run's temporary buffers in one block (480 MB for the `small`
preset's forward pass at 8 x 256, about 2.3 GB for its training step) with
`posix_memalign`, from one of its worker threads. glibc gives such a thread its own arena,
whose heaps hold at most 64 MiB, so a larger block is always a fresh `mmap`, unmapped
again on free, whatever `mmap_threshold` or `mmap_max` say. Every step then faults every
page of those buffers in anew: about 150,000 page faults per `small` forward pass and
586,000 per training step here. One arena for all threads (`arena_max=1`) keeps the
memory and ends the faults, but its lock cost the training step more than the faults did
(docs/benchmarks.md). glibc's `glibc.malloc.hugetlb=1` tunable (glibc 2.35+) asks for
transparent huge pages on such mappings, 400 times fewer faults: the `small` training step
ran 1.17x and its forward pass 1.07x faster on a 2-core machine (`bench/allocator.py`;
not a sure gain where other work shares the process, docs/benchmarks.md). The tunable is
read only when a process starts, so `python -m train` starts again with it set
(`reexec`), before importing JAX. Set DSJAX_HUGEPAGES=0 to run without; from a notebook,
start Jupyter with GLIBC_TUNABLES=glibc.malloc.hugetlb=1.

Imports nothing heavy: it runs before JAX loads.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DSJAX_HUGEPAGES"
_MARK = "DSJAX_ALLOCATOR_REEXEC"


def _glibc_supports_hugetlb() -> bool:
    """Linux with glibc 2.35 or later (the first with the hugetlb tunable)."""
    if not sys.platform.startswith("linux"):
        return False
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def hugepage_env(environ: dict | None = None) -> dict | None:
    """A copy of `environ` (default os.environ) with the hugetlb tunable added to
    GLIBC_TUNABLES, or None where there is nothing to change: not glibc 2.35+ on Linux,
    already set (or any hugetlb value chosen), DSJAX_HUGEPAGES=0, or this process was
    already started again once."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get(OPT_OUT, "1") == "0" or environ.get(_MARK) or not _glibc_supports_hugetlb():
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    environ[_MARK] = "1"
    return environ


def reexec() -> None:
    """Starts this Python process again, same command line, with `hugepage_env`; returns
    (doing nothing) where that is None. Call it first thing in a `__main__` block."""
    env = hugepage_env()
    if env is None:
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # cannot exec here (a sandbox, an odd interpreter): run as we are
        return
