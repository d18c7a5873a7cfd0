"""Compiled temp memory of one MLA layer's attention, forward + backward, dense scores vs
the blockwise online softmax (model.attn_kernel), from XLA's own memory_analysis.

    python -m bench.attention_memory [--preset small] [--seq-len 4096] [--batch 1] [--speed]

Prints one JSON line: temp bytes of each kernel and their ratio. Compiles only (nothing
runs), so it takes seconds on a CPU. The memory is that of the kernels' JAX form,
compiled with the CPU wing's native kernels off (their scratch is invisible to XLA).
`--speed` also times the layer's forward + backward under each kernel on this machine at
8 x 256 and 1 x 2048 tokens (interleaved, best of 5): `dense`, `blockwise` (the JAX
form) and `cpu`, the CPU wing's native attention (dsjax/cpu/attention.py, blockwise
where it does not apply), what `attn_kernel=auto` resolves to on a CPU.
"""

import argparse
import contextlib
import os
import sys

if __package__ in (None, ""):  # run as a file, python bench/attention_memory.py: the repository's packages first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from bench.common import emit, interleaved
from dsjax.config import load_model_config
from dsjax.mla import MLA
from dsjax.model import attention_mask, unbox
from dsjax.rope import rope_tables


def _layer_step(cfg, batch: int, seq_len: int):
    """(jitted value_and_grad over one MLA layer w.r.t. parameters and input, its arguments)."""
    mla = MLA(cfg)
    x = jax.ShapeDtypeStruct((batch, seq_len, cfg.hidden_size), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    cos, sin = rope_tables(cfg, positions)
    params = unbox(jax.eval_shape(lambda x: mla.init(jax.random.key(0), x, cos, sin,
                                                     attention_mask(batch, seq_len)), x))

    def loss(p, x):
        return mla.apply(p, x, cos, sin, attention_mask(batch, seq_len)).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, x)


@contextlib.contextmanager
def xla_only():
    """Traces inside run XLA's own ops, not dsjax's native CPU kernels (DSJAX_CPU_KERNELS=0)."""
    saved = os.environ.get("DSJAX_CPU_KERNELS")
    os.environ["DSJAX_CPU_KERNELS"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["DSJAX_CPU_KERNELS"]
        else:
            os.environ["DSJAX_CPU_KERNELS"] = saved


def temp_bytes(cfg, batch: int, seq_len: int) -> int:
    """Temp memory of value_and_grad over one MLA layer (parameters and input) at this
    length, the kernels in their JAX form (`xla_only`)."""
    with xla_only():
        step, args = _layer_step(cfg, batch, seq_len)
        return int(step.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def layer_ms(cfg, batch: int, seq_len: int, kernels=("dense", "blockwise", "cpu"),
             reps: int = 5) -> dict[str, float]:
    """Best-of-`reps` milliseconds of one layer's forward + backward under each kernel,
    the kernels timed in turn so that all see the same machine."""
    runs = {}
    for kernel in kernels:
        step, (shapes, x) = _layer_step(cfg.replace(attn_kernel=kernel), batch, seq_len)
        params = jax.tree.map(lambda s: jnp.full(s.shape, 0.02, s.dtype), shapes)
        xs = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
        jax.block_until_ready(step(params, xs))
        runs[kernel] = lambda step=step, params=params, xs=xs: step(params, xs)
    return {k: round(min(t) * 1e3, 1) for k, t in interleaved(runs, reps).items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--speed", action="store_true", help="also time the kernels at 8 x 256 and 1 x 2048")
    args = p.parse_args()
    cfg = load_model_config(args.preset)
    dense = temp_bytes(cfg.replace(attn_kernel="dense"), args.batch, args.seq_len)
    block = temp_bytes(cfg.replace(attn_kernel="blockwise"), args.batch, args.seq_len)
    out = {"name": "attention_memory", "preset": args.preset, "batch": args.batch,
           "seq_len": args.seq_len, "heads": cfg.num_attention_heads,
           "dense_temp_mib": round(dense / 2**20, 1), "blockwise_temp_mib": round(block / 2**20, 1),
           "reduction": round(dense / max(block, 1), 2)}
    if args.speed:
        for b, t in ((8, 256), (1, 2048)):
            for kernel, ms in layer_ms(cfg, b, t).items():
                out[f"{kernel}_ms_{b}x{t}"] = ms
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
