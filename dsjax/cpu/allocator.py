"""The CPU wing's allocator settings: XLA:CPU's buffers kept mapped between steps
(`keep_buffers`, in the process), and transparent huge pages for them (`reexec`, set
before the process starts); Linux, glibc.

XLA:CPU allocates each run's temporary buffers in one block (hundreds of MB to GB for
the `small` preset) with `posix_memalign`, from one of its worker threads. glibc gives
such a thread its own arena, whose heaps hold at most 64 MiB, so a larger block is always a fresh `mmap`, unmapped
again on free, whatever `mmap_threshold` or `mmap_max` say. Every step then faults every
page of those buffers in anew. One arena for all threads (`arena_max=1`) keeps the
memory and ends the faults, but its lock costs the training step more than the faults do
(docs/benchmarks.md). glibc's `glibc.malloc.hugetlb=1` tunable (glibc 2.35+) asks for
transparent huge pages on such mappings, a few hundred times fewer faults
(`bench/allocator.py`; not a sure gain where other work shares the process). The tunable is
read only when a process starts, so `python -m train` starts again with it set
(`reexec`) before JAX starts. Set DSJAX_HUGEPAGES=0 to run without; from a notebook,
start Jupyter with GLIBC_TUNABLES=glibc.malloc.hugetlb=1.

`keep_buffers()` removes the faults where they start: it runs CPU computations on the
calling thread (`jax_cpu_enable_async_dispatch=False`), whose glibc arena is the main one,
and tells glibc to serve large blocks from its heap and never give the heap back
(`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, -1)`), so each step reuses the last
step's pages (figures in docs/benchmarks.md). It costs what those settings say: the
process keeps its peak heap until it exits, and Python no longer runs ahead of the CPU
computations it dispatches. Call it before JAX's first computation (the dispatch setting
is read when the CPU backend starts), in a notebook too; `python -m train` and
`bench/vs_hf.py` call it. DSJAX_KEEP_BUFFERS=0 turns it off.

Both apply to programs that run on a CPU only. `runs_on_cpu` decides that before JAX
starts, from what is installed, asked for and attached: JAX_PLATFORMS (its first entry)
when set, else the CPU unless an accelerator plugin is installed (a `jax_plugins` entry
point or module) or libtpu is installed on a machine with a TPU attached (a device node
/dev/accel* or /dev/vfio/<number>): libtpu alone (the `tpu` extra, which compiles for TPU
slices from any host) leaves a CPU machine a CPU machine. `python -m train` calls `reexec`
and `keep_buffers` only then.

The module imports JAX only inside `keep_buffers`.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DSJAX_HUGEPAGES"
KEEP_OPT_OUT = "DSJAX_KEEP_BUFFERS"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (malloc.h)
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


# Device nodes of an attached TPU: /dev/accel0... (v2-v4, v5e, v6e), /dev/vfio/0... (v5p
# and later, through VFIO; /dev/vfio/vfio itself is VFIO's control node on any machine).
TPU_DEVICE_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*")


def tpu_attached(dev_globs: tuple[str, ...] = TPU_DEVICE_NODES) -> bool:
    """Whether a TPU device node is present (any path matching `dev_globs`)."""
    import glob

    return any(glob.glob(pattern) for pattern in dev_globs)


def runs_on_cpu(environ: dict | None = None, dev_globs: tuple[str, ...] = TPU_DEVICE_NODES) -> bool:
    """Whether this program's JAX will run on a CPU, decided without starting JAX: the
    first entry of JAX_PLATFORMS when it is set; else not when an accelerator plugin is
    installed (a `jax_plugins` entry point or module), nor when libtpu is installed and a
    TPU is attached (`tpu_attached(dev_globs)`); else the CPU."""
    import importlib.metadata
    import importlib.util

    environ = os.environ if environ is None else environ
    asked = environ.get("JAX_PLATFORMS", "").strip()
    if asked:
        return asked.split(",")[0].strip().lower() == "cpu"
    if importlib.metadata.entry_points(group="jax_plugins") or importlib.util.find_spec("jax_plugins") is not None:
        return False
    return importlib.util.find_spec("libtpu") is None or not tpu_attached(dev_globs)


def keep_buffers() -> str | None:
    """Keeps XLA:CPU's per-step buffers mapped (see the module docstring): synchronous CPU
    dispatch, and glibc serving large blocks from a heap it never trims. Call it only for
    a program that runs on a CPU, before JAX's first computation. Returns what it set, or
    None where it did nothing: not Linux with glibc, or DSJAX_KEEP_BUFFERS=0."""
    if os.environ.get(KEEP_OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    import ctypes

    import jax

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
        return None
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return "jax_cpu_enable_async_dispatch=False, mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)"
