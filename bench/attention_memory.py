"""Compiled temp memory of one MLA layer's attention, forward + backward, dense scores vs
the blockwise online softmax (model.attn_kernel), from XLA's own memory_analysis.

    python bench/attention_memory.py [--preset small] [--seq-len 4096] [--batch 1]

Prints one JSON line: temp bytes of each kernel and their ratio. Compiles only (nothing
runs), so it takes seconds on a CPU.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsjax.config import load_model_config  # noqa: E402
from dsjax.mla import MLA  # noqa: E402
from dsjax.model import attention_mask, unbox  # noqa: E402
from dsjax.rope import rope_tables  # noqa: E402


def temp_bytes(cfg, batch: int, seq_len: int) -> int:
    """Temp memory of value_and_grad over one MLA layer (parameters and input) at this length."""
    mla = MLA(cfg)
    x = jax.ShapeDtypeStruct((batch, seq_len, cfg.hidden_size), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    cos, sin = rope_tables(cfg, positions)
    params = unbox(jax.eval_shape(lambda x: mla.init(jax.random.key(0), x, cos, sin,
                                                     attention_mask(batch, seq_len)), x))

    def loss(p, x):
        return mla.apply(p, x, cos, sin, attention_mask(batch, seq_len)).sum()

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    cfg = load_model_config(args.preset)
    dense = temp_bytes(cfg.replace(attn_kernel="dense"), args.batch, args.seq_len)
    block = temp_bytes(cfg.replace(attn_kernel="blockwise"), args.batch, args.seq_len)
    print(json.dumps({"name": "attention_memory", "preset": args.preset, "batch": args.batch,
                      "seq_len": args.seq_len, "heads": cfg.num_attention_heads,
                      "dense_temp_mib": round(dense / 2**20, 1), "blockwise_temp_mib": round(block / 2**20, 1),
                      "reduction": round(dense / max(block, 1), 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
