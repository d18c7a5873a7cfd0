"""pytest setup: 8 fake CPU devices, float32 matmuls at full precision, a compilation
cache shared by the subprocesses."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def subprocess_jit_cache(tmp_path_factory):
    """The `python -m train` / `python -m eval` subprocesses of the tests share JAX's
    persistent compilation cache, so a program compiled by one run is loaded by the next
    (this process read its JAX settings at import and does not use it)."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jit_cache"))
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
