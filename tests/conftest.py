"""pytest setup: 8 fake CPU devices, float32 matmuls at full precision, fast compilation,
a compilation cache shared by the subprocesses."""

import os
import sys

# The tests' models are tiny: XLA spends far longer compiling their programs than running
# them. Without LLVM optimization and with the plain loop emitters a program compiles in
# about a third of the time (and runs a few times slower, still in milliseconds).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process with `devices` fake CPU devices that compiles as the tests do."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# In-process runs (python -m train's main() called by the tests) recompile the same train,
# eval and generate programs run after run; a persistent compilation cache for this
# process too lets the second run of a program load it instead of compiling again.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_CACHE = tempfile.mkdtemp(prefix="dsjax_jit_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def subprocess_jit_cache(tmp_path_factory):
    """The `python -m train` / `python -m eval` subprocesses of the tests share JAX's
    persistent compilation cache with this process, so a program compiled by one run is
    loaded by the next. They compute as this process does (the same matmul precision), so
    a subprocess with this process's devices loads the programs compiled here too."""
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
