"""Implementation choices: how the model computes, as opposed to what it is.

`ModelConfig` holds the implementation fields (`IMPL_FIELDS`) beside the architecture;
this module says which values each may take, resolves 'auto' for the platform a program
is compiled for (`resolve`), and keeps the table of implementations registered by name
(`register` / `lookup`), through which the core reaches the platform wings (the CPU wing,
`dsjax.cpu`, registers its kernels here; no core module imports it).

Resolution happens once per program, for the platform of the devices it is compiled for
(`platform_of`: a mesh's devices, also those of an abstract TPU topology), never from the
host's backend: a program lowered for a TPU from a CPU host gets the TPU's values. What
still depends on the call (a one-query decode step, the tokens a MoE call holds, the
mesh a layer stack runs under) is decided inside the resolved value's implementation.

Resolved values, per field:
- attn_kernel: 'splash' on a TPU (Pallas's splash kernel for the naive form's causal
  calls, `dsjax/splash_attention.py`), 'cudnn' on a GPU in bfloat16/float16, 'cpu' on a
  CPU (the CPU wing's native attention where it applies, blockwise otherwise),
  'blockwise' elsewhere.
- moe_impl: 'ragged' on GPUs and TPUs; on a CPU 'cpu' (the CPU wing's choice per call:
  the gather dispatch for at most two token copies per expert, blocked otherwise), or
  'dense' under the FP8 recipe.
- layer_loop: 'scan' on GPUs and TPUs; on a CPU 'unroll_single_device' (unrolled on one
  device, scanned under a mesh of several).
- matmul_impl: 'cpu' on a CPU (the CPU wing's linear layers), 'xla' elsewhere.
- fp8_gemm: 'emulated' on a CPU, 'native' elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import jax

if TYPE_CHECKING:
    from dsjax.config import ModelConfig

PLATFORMS = ("cpu", "gpu", "tpu")

ATTN_IMPLS = ("naive", "absorb")
ATTN_KERNELS = ("auto", "dense", "blockwise", "cudnn", "splash", "cpu")
MOE_IMPLS = ("auto", "dense", "ragged", "blocked", "gather", "cpu")
LAYER_LOOPS = ("auto", "scan", "unroll", "unroll_single_device")
MATMUL_IMPLS = ("auto", "xla", "cpu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("default", "fp8")
FP8_GEMMS = ("auto", "native", "emulated")

# The fields that choose how the model computes, not what it is: they leave the parameters'
# shapes and meaning alone, so a trained checkpoint can be run under any of their values.
IMPL_FIELDS = ("attn_impl", "attn_kernel", "moe_impl", "dtype", "param_dtype", "remat_policy", "layer_loop",
               "matmul_impl", "precision", "fp8_gemm", "fp8_pow2_scales")

CHOICES = {"attn_impl": ATTN_IMPLS, "attn_kernel": ATTN_KERNELS, "moe_impl": MOE_IMPLS,
           "remat_policy": REMAT_POLICIES, "layer_loop": LAYER_LOOPS, "matmul_impl": MATMUL_IMPLS,
           "dtype": DTYPES, "param_dtype": DTYPES, "precision": PRECISIONS, "fp8_gemm": FP8_GEMMS}

# moe_impl values whose dispatches have no FP8 form.
_NO_FP8 = ("blocked", "gather", "cpu")

# The collection of weight copies a platform's decode hook makes once per `generate` call
# (the CPU wing: transposed and folded copies for its few-row kernels, wkv_b head-major).
DECODE_COPIES = "cpu_decode"

_TABLE: dict[tuple[str, str], Callable] = {}


def check(cfg: "ModelConfig") -> list[tuple[str, str]]:
    """(field, message) for each implementation field of `cfg` outside its choices, and
    for combinations with no implementation; empty when all is well."""
    bad = [(name, f"{name}={getattr(cfg, name)!r} is not one of {list(allowed)}")
           for name, allowed in CHOICES.items() if getattr(cfg, name) not in allowed]
    if cfg.precision == "fp8" and cfg.moe_impl in _NO_FP8:
        bad.append(("moe_impl", f"moe_impl={cfg.moe_impl!r} has no FP8 form: use 'auto', 'dense' or 'ragged' "
                                "with precision='fp8'"))
    if not isinstance(cfg.fp8_pow2_scales, bool):
        bad.append(("fp8_pow2_scales", f"fp8_pow2_scales={cfg.fp8_pow2_scales!r} must be true or false"))
    return bad


def platform_of(mesh_or_devices: Any = None) -> str:
    """'cpu', 'gpu' or 'tpu': the platform of a mesh's devices (a concrete Mesh, a list of
    devices, or an abstract topology's devices), else of the mesh set with
    `jax.set_mesh` (outside jit: inside, only the abstract mesh is known), else of the
    default device."""
    devices = mesh_or_devices
    if devices is None:
        try:
            mesh = jax.sharding.get_mesh()
        except ValueError:  # tracing under jit
            mesh = None
        devices = None if mesh is None or mesh.empty else mesh.devices
    elif hasattr(devices, "devices"):
        devices = devices.devices
    if devices is None:
        device = jax.devices()[0]
    else:
        flat = getattr(devices, "flat", None)
        device = next(iter(flat if flat is not None else devices))
    platform = device.platform.lower()
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve(cfg: "ModelConfig", platform: str) -> "ModelConfig":
    """`cfg` with every 'auto' implementation field replaced by its value for `platform`
    ('cpu', 'gpu' or 'tpu'; see the module docstring). Fields already set are kept."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} is not one of {list(PLATFORMS)}")
    cpu, half = platform == "cpu", cfg.dtype in ("bfloat16", "float16")
    auto = {
        "attn_kernel": "cpu" if cpu else "splash" if platform == "tpu" else "cudnn" if half else "blockwise",
        "moe_impl": ("dense" if cfg.precision == "fp8" else "cpu") if cpu else "ragged",
        "layer_loop": "unroll_single_device" if cpu else "scan",
        "matmul_impl": "cpu" if cpu else "xla",
        "fp8_gemm": "emulated" if cpu else "native",
    }
    changes = {name: value for name, value in auto.items() if getattr(cfg, name) == "auto"}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def unresolved(cfg: "ModelConfig") -> "ModelConfig":
    """`cfg` with every field that takes 'auto' set back to 'auto': a run directory records
    the choices made for the devices that trained it, and a program for other devices (a
    checkpoint read on another platform, a run started from another run) makes its own."""
    changes = {name: "auto" for name, allowed in CHOICES.items() if "auto" in allowed and getattr(cfg, name) != "auto"}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def resolved(cfg: "ModelConfig") -> "ModelConfig":
    """`resolve(cfg, platform_of())`, for a program traced now: the platform of the mesh set
    with `jax.set_mesh` where it is known, else of the default device. A program compiled
    for other devices (an abstract TPU topology from a CPU host) takes a config resolved
    for them beforehand (`resolve`)."""
    if all(getattr(cfg, name) != "auto" for name in ("attn_kernel", "moe_impl", "layer_loop", "matmul_impl",
                                                     "fp8_gemm")):
        return cfg
    return resolve(cfg, platform_of())


def register(kind: str, name: str, fn: Callable) -> None:
    """Makes `fn` the implementation `name` of `kind` ('matmul', 'moe', 'attention', ...)."""
    _TABLE[(kind, name)] = fn


def lookup(kind: str, name: str) -> Callable | None:
    """The implementation `name` of `kind`, or None where none is registered (the caller
    then runs its reference form)."""
    return _TABLE.get((kind, name))


def attention_kernel(cfg: "ModelConfig", queries: int, absorbed: bool = False) -> str:
    """The kernel of one attention call with `queries` new tokens: 'dense' for one-query
    decode steps (their scores are [B, H, 1, S]) and under 'dense'; the absorbed form's
    one shared latent head runs 'blockwise' under every other kernel; otherwise
    `cfg.attn_kernel` resolved ('blockwise', 'cudnn', 'splash', or a registered
    'attention' name). 'cudnn' and 'splash' fall back to 'blockwise' per call where
    their kernel refuses the shapes (`dsjax.splash_attention.unsupported`)."""
    kernel = resolved(cfg).attn_kernel
    if queries == 1 or kernel == "dense":
        return "dense"
    return "blockwise" if absorbed else kernel


def unroll_layers(cfg: "ModelConfig") -> bool:
    """Whether the stacked layers run unrolled (`layer_loop` resolved): 'unroll', or
    'unroll_single_device' outside a mesh of several devices. On one CPU device a scan
    slices every layer's weights out of the stack and writes its gradients and saved
    activations back each step; under a mesh of several devices an unrolled stack has XLA
    gather every layer's sharded weights at once."""
    loop = resolved(cfg).layer_loop
    return loop == "unroll" or (loop == "unroll_single_device" and jax.sharding.get_abstract_mesh().size <= 1)


def moe_dispatch(cfg: "ModelConfig", tokens: int | None = None) -> str:
    """The registered 'moe' dispatch a MoE call on `tokens` tokens of one device runs
    (None: a training-sized call): `moe_impl` resolved, or, for a name that chooses per
    call (the CPU wing's 'cpu'), its 'moe_choice' for that call."""
    name = resolved(cfg).moe_impl
    choose = lookup("moe_choice", name)
    return choose(cfg, tokens) if choose is not None else name
