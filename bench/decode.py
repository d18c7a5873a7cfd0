"""Decoding beyond vs_hf: naive vs absorbed MLA decode steps at long contexts (speed and
cache size), and plain vs MTP speculative greedy decoding on a trained model.

    python -m bench.decode [--preset small] [--contexts 256,1024,4096] [--batch 4] [--steps 32]
    python -m bench.decode --measures speculative [--workdir workdir] [--prompts 8] [--new-tokens 128]

`mla` (one JSON line): for each attention form and context length, decode tokens/s
(batch x steps / the time of `steps` jitted one-token decode steps on a cache of
`context` slots, after one warm-up step) and the cache bytes. Random weights.

`speculative` (one JSON line) needs a model trained by `python -m train --workdir DIR`
(skipped, with a note on stderr, where --workdir holds none): greedy `dsjax.generate`
with and without MTP speculation on held-out text of its corpus, after one compiling
call each: tokens per main-model forward pass, the draft acceptance rate, the wall time
of both and the speedup, and whether the outputs agree token for token.

dsjax's decoding against transformers' (absorbed MLA, batch 1 and 8) is `vs_hf`'s.
"""

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a file, python bench/decode.py: the repository's packages first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

import dsjax
from bench.common import emit
from dsjax.model import cache_bytes, init_cache


def decode_rate(model, variables, batch: int, context: int, steps: int) -> float:
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


def mla(preset: str, contexts: list[int], batch: int, steps: int) -> dict:
    """The `mla` line: naive vs absorbed decode steps per context."""
    cfg = dsjax.load_model_config(preset)
    variables = dsjax.unbox(dsjax.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    line = {"name": "decode", "measure": "mla", "preset": preset, "batch": batch, "steps": steps,
            "device": jax.devices()[0].device_kind, "runs": []}
    for ctx in contexts:
        for form in ("naive", "absorb"):
            model = dsjax.Transformer(cfg.replace(attn_impl=form))
            tps = decode_rate(model, variables, batch, ctx, steps)
            line["runs"].append({"impl": form, "context": ctx, "decode_tokens_per_s": round(tps, 1),
                                 "cache_bytes": cache_bytes(model, batch, ctx)})
    return line


def speculative(workdir: str, prompts: int, prompt_len: int, new_tokens: int) -> dict:
    """The `speculative` line: plain vs MTP speculative greedy decoding of a trained model."""
    from dsjax.checkpoint import load_trained
    from dsjax.data import DataConfig, load_corpus
    from dsjax.tokenizer import load_tokenizer

    model, variables, run = load_trained(workdir)
    tokenizer = load_tokenizer(run["data"]["tokenizer"])
    corpus = load_corpus(DataConfig(**run["data"]), tokenizer)  # held-out text for prompts
    starts = np.random.default_rng(0).integers(0, len(corpus.val) - prompt_len, prompts)
    tokens = np.stack([corpus.val[s:s + prompt_len] for s in starts])
    lengths = np.full((prompts,), prompt_len)

    def timed(spec: bool):
        call = lambda: dsjax.generate(model, variables, tokens, lengths, new_tokens, speculative=spec)  # noqa: E731
        jax.block_until_ready(call().tokens)  # compile
        start = time.perf_counter()
        out = call()
        jax.block_until_ready(out.tokens)
        return out, time.perf_counter() - start

    plain, t_plain = timed(False)
    spec, t_spec = timed(True)
    return {"name": "decode", "measure": "speculative", "workdir": workdir, "prompts": prompts,
            "new_tokens": new_tokens, "plain_tokens_per_forward": round(plain.tokens_per_forward, 3),
            "speculative_tokens_per_forward": round(spec.tokens_per_forward, 3),
            "acceptance_rate": round(spec.acceptance_rate, 3),
            "plain_s": round(t_plain, 3), "speculative_s": round(t_spec, 3), "speedup": round(t_plain / t_spec, 3),
            "identical_tokens": bool(np.array_equal(np.asarray(plain.tokens), np.asarray(spec.tokens)))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measures", default="mla,speculative", help="comma-separated subset of mla,speculative")
    p.add_argument("--preset", default="small", help="mla: the random model's preset")
    p.add_argument("--contexts", default="256,1024,4096", help="mla: cache positions the steps start at")
    p.add_argument("--batch", type=int, default=4, help="mla: decode batch")
    p.add_argument("--steps", type=int, default=32, help="mla: timed decode steps")
    p.add_argument("--workdir", default="workdir", help="speculative: a `python -m train` workdir")
    p.add_argument("--prompts", type=int, default=8, help="speculative: prompts (the batch)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    measures = args.measures.split(",")
    unknown = set(measures) - {"mla", "speculative"}
    if unknown:
        p.error(f"unknown measures {sorted(unknown)}; known: mla, speculative")
    if "mla" in measures:
        emit(mla(args.preset, [int(c) for c in args.contexts.split(",")], args.batch, args.steps))
    if "speculative" in measures:
        if os.path.exists(os.path.join(args.workdir, "config.yaml")):
            emit(speculative(args.workdir, args.prompts, args.prompt_len, args.new_tokens))
        else:
            print(f"[decode] speculative skipped: {args.workdir} holds no trained model; run "
                  f"`python -m train --workdir {args.workdir}` first (or pass --workdir DIR)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
