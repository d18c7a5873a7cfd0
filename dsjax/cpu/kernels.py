"""Native CPU kernels, built on first use and called from jitted code as XLA FFI custom calls.

Seven entry points (dsjax/cpu/csrc/cpu_kernels.cc), all float32: for decoding, the
routed experts, few-row products and absorbed attention; for training and prefill, the
routed experts and the attention:

- `gather_swiglu`: the gather dispatch's routed experts (`dsjax.cpu.moe.experts_gather`),
  and the layer's shared experts with them. XLA:CPU copies a dynamically indexed
  expert's weights into a new buffer before each product and runs the few-row products
  below the memory bandwidth; the kernel reads each chosen expert in place, once a step.
- `rows_dot`: x [M, K] @ wt [N, K]^T for up to 32 rows (`dsjax.cpu.linear.matmul` with
  a transposed copy of the weight, `dsjax.cpu.decode.weight_copies`): the projections,
  dense MLPs and output head of a decode step, as dot products of contiguous rows.
- `latent_attention`: absorbed MLA's attention over the cached latents in a decode step
  (up to 16 new tokens a row), W_UV included: one call for what XLA runs as about a dozen
  small ops per layer.
- `blocked_swiglu_fwd` / `blocked_swiglu_bwd`: the blocked dispatch's experts
  (`dsjax.cpu.moe.experts_blocked`), forward and backward, each expert's rows one work
  item through a packed, register-tiled GEMM whose tile follows the vector width of the
  build (AVX-512: 12 rows x 32 columns; AVX2 and SSE: 6 x 16 or 6 x 8), where XLA:CPU
  runs the per-block products as a loop of small dots.
- `attention_fwd` / `attention_bwd`: softmax attention with a key and value head per
  query head (`dsjax.cpu.attention.native_attention`, MLA's naive form): each batch row
  and head one work item, its queries in chunks of 64 whose scores stay in cache, the
  products through the same packed GEMM, keys past a chunk's last visible one skipped.

Figures for each are in docs/benchmarks.md.

The source is compiled once per machine with the C++ compiler (`$CXX`, else `c++`) against
JAX's FFI headers (`jax.ffi.include_dir()`), `-O3 -march=native`, into
`$DSJAX_CACHE_DIR` (default `~/.cache/dsjax`, or the temp directory where the home
cannot be written), under a name that hashes the source, the
flags, jaxlib's version and the CPU; a few seconds the first time, a load afterwards.
Where that fails (no compiler, say), `available()` is False, a warning names the reason
once, and the callers keep their XLA form: the kernels are speed, never a requirement.
`DSJAX_CPU_KERNELS=0` turns them off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu_kernels.cc")
TARGET = "dsjax_gather_swiglu"
ROWS_TARGET = "dsjax_rows_dot"
BLOCKED_FWD_TARGET = "dsjax_blocked_swiglu_fwd"
BLOCKED_BWD_TARGET = "dsjax_blocked_swiglu_bwd"
LATENT_TARGET = "dsjax_latent_attention"
ATTENTION_FWD_TARGET = "dsjax_attention_fwd"
ATTENTION_BWD_TARGET = "dsjax_attention_bwd"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")

_state: dict = {}  # "lib" once loaded and registered, or "error": why not
_lock = threading.Lock()  # one build and one registration per process


def cache_dir() -> str:
    """$DSJAX_CACHE_DIR, else ~/.cache/dsjax, else (a home that cannot be written) a
    directory of this user's under the system's temp directory."""
    if os.environ.get("DSJAX_CACHE_DIR"):
        return os.environ["DSJAX_CACHE_DIR"]
    home = os.path.join(os.path.expanduser("~"), ".cache", "dsjax")
    try:
        os.makedirs(home, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return os.path.join(tempfile.gettempdir(), f"dsjax-{os.getuid() if hasattr(os, 'getuid') else 'user'}")


def _cpu_id() -> str:
    """The CPU the build targets (-march=native): model name and flags from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def build(directory: str | None = None, compiler: str | None = None) -> str:
    """Compiles the kernel library if no build of this source, compiler flags, jaxlib and CPU
    is cached yet; returns its path. Raises RuntimeError naming the problem."""
    import jaxlib

    compiler = compiler or os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     jaxlib.__version__.encode(), _cpu_id().encode()])).hexdigest()[:16]
    directory = directory or cache_dir()
    path = os.path.join(directory, f"cpu_kernels-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)  # one per process: builds may race
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            first = next((l for l in done.stderr.splitlines() if "error" in l), done.stderr.strip()[:200])
            raise RuntimeError(f"{compiler} failed on {os.path.basename(SOURCE)}: {first}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def available() -> bool:
    """The kernels are built, loaded and registered with XLA for the CPU (builds on the first
    call; False, with one warning, where that fails or DSJAX_CPU_KERNELS=0)."""
    if os.environ.get("DSJAX_CPU_KERNELS", "1") == "0":
        return False
    with _lock:
        if "lib" in _state:
            return True
        if "error" in _state:
            return False
        try:
            lib = ctypes.cdll.LoadLibrary(build())
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.DsjaxGatherSwiglu), platform="cpu")
            jax.ffi.register_ffi_target(ROWS_TARGET, jax.ffi.pycapsule(lib.DsjaxRowsDot), platform="cpu")
            jax.ffi.register_ffi_target(BLOCKED_FWD_TARGET, jax.ffi.pycapsule(lib.DsjaxBlockedSwigluFwd),
                                        platform="cpu")
            jax.ffi.register_ffi_target(BLOCKED_BWD_TARGET, jax.ffi.pycapsule(lib.DsjaxBlockedSwigluBwd),
                                        platform="cpu")
            jax.ffi.register_ffi_target(LATENT_TARGET, jax.ffi.pycapsule(lib.DsjaxLatentAttention),
                                        platform="cpu")
            jax.ffi.register_ffi_target(ATTENTION_FWD_TARGET, jax.ffi.pycapsule(lib.DsjaxAttentionFwd),
                                        platform="cpu")
            jax.ffi.register_ffi_target(ATTENTION_BWD_TARGET, jax.ffi.pycapsule(lib.DsjaxAttentionBwd),
                                        platform="cpu")
            _state["lib"] = lib
            return True
        except (RuntimeError, OSError) as e:
            _state["error"] = str(e)
            warnings.warn(f"dsjax CPU kernels unavailable, XLA's own ops run instead: {e}", RuntimeWarning,
                          stacklevel=2)
            return False


def applies(*dtypes) -> bool:
    """The kernels run for operands of `dtypes` in a program traced now: all float32, no
    multi-device mesh, and the kernels built (`available()`). Callers reach here only
    from the CPU wing's implementations, which a config resolved for a CPU selects, and
    place each custom call under `jax.lax.platform_dependent`, so a program lowered for
    another platform never holds one."""
    if any(jnp.dtype(d) != jnp.float32 for d in dtypes):
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return (mesh.empty or mesh.size == 1) and available()


def gather_swiglu(x, weights, indices, w1, w3, w2, shared=None):
    """sum_j weights[n, j] * SwiGLU expert indices[n, j] of x[n] (+ the shared experts'
    SwiGLU of x[n] when `shared` = (s1, s3, s2) is given), float32, on a CPU.

    x [N, D], weights and indices [N, K], w1 and w3 [E, D, F], w2 [E, F, D], s1 and s3
    [D, Fs], s2 [Fs, D]; returns [N, D] float32. Call only where `available()`; no
    gradient of its own (the gather dispatch's custom VJP gives one)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    D = x.shape[-1]
    s1, s3, s2 = shared if shared is not None else (jnp.zeros((D, 0)), jnp.zeros((D, 0)), jnp.zeros((0, D)))
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential")(
        f32(x), f32(weights), jnp.asarray(indices, jnp.int32), f32(w1), f32(w3), f32(w2), f32(s1), f32(s3), f32(s2))


def rows_dot(x, wt):
    """x [M, K] @ wt [N, K]^T -> [M, N] float32, on a CPU: the few-row product of a decode
    step with its weight given transposed (`dsjax.cpu.decode.weight_copies`). Call only where
    `available()`; no gradient of its own (`dsjax.cpu.linear.matmul` gives one)."""
    x, wt = jnp.asarray(x, jnp.float32), jnp.asarray(wt, jnp.float32)
    out = jax.ShapeDtypeStruct((x.shape[0], wt.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(ROWS_TARGET, out, vmap_method="sequential")(x, wt)


def blocked_swiglu_fwd(xs, first, count, w1, w3, w2):
    """The blocked dispatch's experts (`dsjax.cpu.moe.experts_blocked`) forward, float32, on a CPU:
    xs [nb, b, D] rows sorted by expert, expert e holding blocks first[e] .. first[e] +
    count[e] - 1 (int32 [E]), w1 and w3 [E, D, F], w2 [E, F, D]. Returns (ys [nb, b, D],
    a1 = xs W1, a3 = xs W3 [nb, b, F]); rows of blocks no expert holds are zero. Call
    only where `available()`; `blocked_swiglu_bwd` is its backward."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    nb, b, _ = xs.shape
    F = w1.shape[2]
    out = (jax.ShapeDtypeStruct(xs.shape, jnp.float32),) + (jax.ShapeDtypeStruct((nb, b, F), jnp.float32),) * 2
    return jax.ffi.ffi_call(BLOCKED_FWD_TARGET, out, vmap_method="sequential")(
        f32(xs), jnp.asarray(first, jnp.int32), jnp.asarray(count, jnp.int32), f32(w1), f32(w3), f32(w2))


def blocked_swiglu_bwd(xs, dys, a1, a3, first, count, w1, w3, w2):
    """The backward of `blocked_swiglu_fwd` given the cotangent dys of ys: (dxs [nb, b, D],
    dW1, dW3 [E, D, F], dW2 [E, F, D]), each expert's weight gradient summed over its rows
    (zero for an expert without rows)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (xs, w1, w3, w2))
    return jax.ffi.ffi_call(BLOCKED_BWD_TARGET, out, vmap_method="sequential")(
        f32(xs), f32(dys), f32(a1), f32(a3), jnp.asarray(first, jnp.int32), jnp.asarray(count, jnp.int32),
        f32(w1), f32(w3), f32(w2))


def latent_attention(q_lat, q_pe, c_kv, k_pe, positions, w, v0: int, scale: float):
    """Absorbed MLA attention of a decode step, float32, on a CPU: q_lat [B, T, H, C] and
    q_pe [B, T, H, R] against the cached latents c_kv [B, S, C] and k_pe [B, S, R], each
    query (b, t) seeing the slots s <= positions[b, t] (int32 [B, T]), then W_UV per head:
    softmax(scale * (q_lat c_kv^T + q_pe k_pe^T)) c_kv w[h][:, v0:], with w [H, C, W]
    (wkv_b head-major; W_UV its columns from v0). Returns [B, T, H, W - v0]. Call only
    where `available()`; no gradient (decoding only)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = jax.ShapeDtypeStruct(q_lat.shape[:3] + (w.shape[-1] - v0,), jnp.float32)
    return jax.ffi.ffi_call(LATENT_TARGET, out, vmap_method="sequential")(
        f32(q_lat), f32(q_pe), f32(c_kv), f32(k_pe), jnp.asarray(positions, jnp.int32), f32(w),
        scale=np.float32(scale), v0=np.int64(v0))


def attention_fwd(q, k, v, mask, scale: float):
    """Softmax attention with a key and value head per query head, float32, on a CPU:
    q [B, T, H, K], k [B, S, H, K], v [B, S, H, V], mask bool [B, T, S] (True attends) ->
    (o [B, T, H, V], lse [B, H, T]); masked scores are -1e30 as in the dense softmax. Call
    only where `available()`; `attention_bwd` is its backward (`dsjax.cpu.attention.
    native_attention` pairs them)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    B, T, H, _ = q.shape
    out = (jax.ShapeDtypeStruct((B, T, H, v.shape[-1]), jnp.float32), jax.ShapeDtypeStruct((B, H, T), jnp.float32))
    return jax.ffi.ffi_call(ATTENTION_FWD_TARGET, out, vmap_method="sequential")(
        f32(q), f32(k), f32(v), jnp.asarray(mask, jnp.bool_), scale=np.float32(scale))


def attention_bwd(q, k, v, mask, o, lse, do, scale: float):
    """The backward of `attention_fwd` given its outputs o, lse and the cotangent do of o:
    (dq, dk, dv), float32, shaped like q, k, v."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
    return jax.ffi.ffi_call(ATTENTION_BWD_TARGET, out, vmap_method="sequential")(
        f32(q), f32(k), f32(v), jnp.asarray(mask, jnp.bool_), f32(o), f32(lse), f32(do), scale=np.float32(scale))
