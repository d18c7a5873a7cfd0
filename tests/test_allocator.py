"""dsjax/cpu/allocator.py: XLA's buffers kept mapped between steps, and the entry points
started again with huge pages for them, on a CPU only."""

import os
import subprocess
import sys

import pytest

from dsjax.cpu import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORTED = allocator._glibc_supports_hugetlb()


@pytest.mark.skipif(not SUPPORTED, reason="needs Linux with glibc 2.35+")
def test_hugepage_env_adds_the_tunable_once_and_respects_the_user():
    env = allocator.hugepage_env({"PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == allocator.TUNABLE and env["PATH"] == "/bin"
    # other tunables are kept
    env = allocator.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + allocator.TUNABLE
    # the user's own hugetlb choice, the opt-out and a process already started again: nothing
    assert allocator.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert allocator.hugepage_env({allocator.OPT_OUT: "0"}) is None
    assert allocator.hugepage_env(env) is None


def test_no_tunable_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.hugepage_env({}) is None
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert allocator.hugepage_env({}) is None


@pytest.mark.skipif(not SUPPORTED, reason="needs Linux with glibc 2.35+")
def test_reexec_starts_the_same_command_again_with_the_tunable():
    code = ("import os, sys; from dsjax.cpu.allocator import reexec; print('start', flush=True); reexec(); "
            "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT)}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", code, "x", "--y"], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    # the first process printed 'start' and was replaced; the second ran to the end
    assert out[:3] == ["start", "start", f"{allocator.TUNABLE} ['x', '--y']"]
    env[allocator.OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:2] == ["start", "None []"]


@pytest.mark.skipif(not SUPPORTED, reason="needs Linux with glibc")
def test_keep_buffers_runs_steps_without_faulting_their_buffers_in_again():
    """`keep_buffers` (what `python -m train` calls): synchronous CPU dispatch and an
    untrimmed heap, so a computation with a large temporary block stops faulting its
    pages in on every call; DSJAX_KEEP_BUFFERS=0 leaves the process as it was.

    XLA:CPU sometimes frees a call's temporary only after the next call has allocated
    its own, so the heap grows by one block a few times before every call finds a free
    one (seen on a loaded host: up to 3 of 10 calls). The test counts the calls that
    fault their block in: fewer than half with `keep_buffers`, every one without."""
    code = """
import resource, jax, jax.numpy as jnp
from dsjax.cpu.allocator import keep_buffers
kept = keep_buffers()
f = jax.jit(lambda x: (jnp.exp(x[:, None] * x[None, :] * 1e-9) @ x).sum())  # a 256 MiB temporary
x = jnp.arange(4096 * 2, dtype=jnp.float32)
value = float(f(x)); float(f(x))
faulting = 0
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert float(f(x)) == value
    faulting += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before > 10_000  # of 65,536 pages
print(kept is not None, jax.config.values["jax_cpu_enable_async_dispatch"], faulting)
"""
    env = {k: v for k, v in os.environ.items() if k not in (allocator.KEEP_OPT_OUT, "XLA_FLAGS")}  # default XLA
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    kept, dispatch, faulting = out.stdout.split()
    assert (kept, dispatch) == ("True", "False") and int(faulting) < 5, (out.stdout, out.stderr[-2000:])
    env[allocator.KEEP_OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "10"], (out.stdout, out.stderr[-2000:])


def test_the_platform_is_decided_before_jax_starts(monkeypatch, tmp_path):
    """JAX_PLATFORMS (its first entry) when set; else the CPU unless an accelerator
    plugin is installed, or libtpu is installed and a TPU device node is present."""
    assert allocator.runs_on_cpu({"JAX_PLATFORMS": "cpu"})
    assert not allocator.runs_on_cpu({"JAX_PLATFORMS": "tpu,cpu"})
    assert not allocator.runs_on_cpu({"JAX_PLATFORMS": "cuda"})
    import importlib.metadata
    import importlib.util

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: ())
    # Device nodes as a TPU VM has them, in a directory of our own: /dev/accel0 (v4, v5e,
    # v6e) or /dev/vfio/0 (v5p); /dev/vfio/vfio alone is VFIO's control node, no TPU.
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "vfio").touch()
    nodes = (str(tmp_path / "accel*"), str(tmp_path / "vfio" / "[0-9]*"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert allocator.runs_on_cpu({}, nodes)
    (tmp_path / "accel0").touch()
    assert allocator.runs_on_cpu({}, nodes)  # a TPU node but no libtpu: JAX runs on the CPU
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    assert not allocator.runs_on_cpu({}, nodes)  # libtpu and a TPU
    (tmp_path / "accel0").unlink()
    assert allocator.runs_on_cpu({}, nodes)  # libtpu alone (the tpu extra on a CPU machine)
    (tmp_path / "vfio" / "0").touch()
    assert not allocator.runs_on_cpu({}, nodes)  # libtpu and a v5p's VFIO node
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "jax_plugins" else None)
    assert not allocator.runs_on_cpu({}, ())  # another accelerator plugin


@pytest.mark.skipif(not SUPPORTED, reason="needs Linux with glibc 2.35+")
def test_python_m_train_starts_again_on_a_cpu_only():
    """`python -m train` re-executes itself with the tunable on a CPU; for a GPU or TPU
    program it neither re-executes nor sets any allocator setting."""
    code = ("import os, runpy, sys; print('start', os.environ.get('GLIBC_TUNABLES'), flush=True); "
            "sys.argv = ['train', '--show-config']; runpy.run_module('train', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT)}
    env["PYTHONPATH"] = ROOT
    starts = {}
    for platform in ("cpu", "tpu"):
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS=platform), cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        starts[platform] = [line for line in out.stdout.splitlines() if line.startswith("start")]
    assert starts["cpu"] == ["start None", f"start {allocator.TUNABLE}"]
    assert starts["tpu"] == ["start None"]
