"""dsjax vs Hugging Face transformers `generate` on the same tiny random checkpoint, same
prompts, same machine, in one run (greedy, no stop tokens).

Prints one JSON line: new tokens per second of each (dsjax after its one-time compile,
which is reported apart), and whether the generated tokens agree.

    python bench/vs_transformers.py [--batch 4] [--prompt-len 32] [--new-tokens 64]
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import dsjax  # noqa: E402
from dsjax.decoding import generate  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    tiny = dsjax.load_model_config("tiny")
    hf_cfg = DeepseekV3Config(**{k: v for k, v in tiny.to_hf().items() if k not in ("architectures",)})
    hf = DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.15)
    prompts = np.random.default_rng(0).integers(2, tiny.vocab_size, (args.batch, args.prompt_len))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, variables = dsjax.from_pretrained(d, attn_impl="absorb")
    lengths = np.full((args.batch,), args.prompt_len)
    start = time.perf_counter()
    jax.block_until_ready(generate(model, variables, prompts, lengths, args.new_tokens).tokens)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = generate(model, variables, prompts, lengths, args.new_tokens)
    jax.block_until_ready(ours.tokens)
    ours_s = time.perf_counter() - start
    ids = torch.from_numpy(prompts).long()
    with torch.no_grad():
        hf.generation_config.eos_token_id = None  # no stop token on either side
        hf.generation_config.pad_token_id = 0
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False)
        hf.generate(ids, max_new_tokens=2, **kwargs)  # warm-up
        start = time.perf_counter()
        theirs = hf.generate(ids, max_new_tokens=args.new_tokens, **kwargs)
        hf_s = time.perf_counter() - start
    theirs = theirs[:, args.prompt_len:].numpy()
    new = args.batch * args.new_tokens
    print(json.dumps({
        "model": "tiny (random)", "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "dsjax_tokens_per_s": round(new / ours_s, 1), "dsjax_compile_s": round(compile_s, 2),
        "transformers_tokens_per_s": round(new / hf_s, 1), "speedup": round(hf_s / ours_s, 2),
        "identical_tokens": bool(np.array_equal(np.asarray(ours.tokens), theirs)),
        "matching_token_fraction": round(float((np.asarray(ours.tokens) == theirs).mean()), 3),
    }))


if __name__ == "__main__":
    main()
