"""train/allocator.py: the entry points start again with huge pages for XLA's buffers."""

import os
import subprocess
import sys

import pytest

from train import allocator

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
    code = ("import os, sys; from train.allocator import reexec; print('start', flush=True); reexec(); "
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
