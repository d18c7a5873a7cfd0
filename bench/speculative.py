"""Plain vs MTP speculative greedy decoding on a model trained by `python -m train`.

Prints one JSON line: tokens per main-model forward pass, draft acceptance rate, wall
time of both and the speedup, and whether the outputs agree token for token.

    python -m train --workdir workdir      # first, if there is no trained model yet
    python bench/speculative.py [--workdir workdir] [--prompts 8] [--new-tokens 128]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsjax.checkpoint import load_trained  # noqa: E402
from dsjax.decoding import generate  # noqa: E402
from dsjax.tokenizer import load_tokenizer  # noqa: E402
from dsjax.data import DataConfig, load_corpus  # noqa: E402


def timed(fn):
    jax.block_until_ready(fn().tokens)  # compile
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out.tokens)
    return out, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="workdir")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.workdir, "config.yaml")):
        sys.exit(f"error: {args.workdir} holds no trained model; run `python -m train --workdir {args.workdir}`")
    model, variables, run = load_trained(args.workdir)
    tokenizer = load_tokenizer(run["data"]["tokenizer"])
    corpus = load_corpus(DataConfig(**run["data"]), tokenizer)  # held-out text for prompts
    starts = np.random.default_rng(0).integers(0, len(corpus.val) - args.prompt_len, args.prompts)
    prompts = np.stack([corpus.val[s:s + args.prompt_len] for s in starts])
    lengths = np.full((args.prompts,), args.prompt_len)
    plain, t_plain = timed(lambda: generate(model, variables, prompts, lengths, args.new_tokens))
    spec, t_spec = timed(lambda: generate(model, variables, prompts, lengths, args.new_tokens, speculative=True))
    print(json.dumps({
        "workdir": args.workdir, "prompts": args.prompts, "new_tokens": args.new_tokens,
        "plain_tokens_per_forward": round(plain.tokens_per_forward, 3),
        "speculative_tokens_per_forward": round(spec.tokens_per_forward, 3),
        "acceptance_rate": round(spec.acceptance_rate, 3),
        "plain_s": round(t_plain, 3), "speculative_s": round(t_spec, 3),
        "speedup": round(t_plain / t_spec, 3),
        "identical_tokens": bool(np.array_equal(np.asarray(plain.tokens), np.asarray(spec.tokens))),
    }))


if __name__ == "__main__":
    main()
