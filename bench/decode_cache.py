"""Decode speed and cache size, naive vs absorbed MLA, on the `small` preset.

Prints one JSON line: for each implementation and context length, decode tokens/s
(batch x steps / time of `steps` jitted one-token decode steps on a cache of `context`
slots, after one warm-up step) and the cache bytes.

    python bench/decode_cache.py [--contexts 256,1024,4096] [--batch 4] [--steps 32]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import dsjax  # noqa: E402
from dsjax.model import cache_bytes, init_cache  # noqa: E402


def decode_rate(model, variables, batch, context, steps):
    """Tokens/s of single-token decode steps at positions context .. context + steps."""
    decoder = model.clone(decode=True)
    cache = init_cache(model, batch, context + steps + 1)

    @jax.jit
    def step(cache, token, position):
        out, mutated = decoder.apply({**variables, "cache": cache}, token, position, mtp=False, mutable=["cache"])
        return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)[:, None], mutated["cache"]

    token = jnp.ones((batch, 1), jnp.int32)
    position = jnp.full((batch, 1), context, jnp.int32)
    token, cache = step(cache, token, position)  # compile
    jax.block_until_ready(token)
    start = time.perf_counter()
    for i in range(steps):
        token, cache = step(cache, token, position + 1 + i)
    jax.block_until_ready(token)
    return batch * steps / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default="256,1024,4096")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--preset", default="small")
    args = p.parse_args()
    cfg = dsjax.load_model_config(args.preset)
    variables = dsjax.unbox(dsjax.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    results = {"preset": args.preset, "batch": args.batch, "device": jax.devices()[0].device_kind, "runs": []}
    for ctx in (int(c) for c in args.contexts.split(",")):
        for impl in ("naive", "absorb"):
            model = dsjax.Transformer(cfg.replace(attn_impl=impl))
            tps = decode_rate(model, variables, args.batch, ctx, args.steps)
            results["runs"].append({"impl": impl, "context": ctx, "decode_tokens_per_s": round(tps, 1),
                                    "cache_bytes": cache_bytes(model, args.batch, ctx)})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
