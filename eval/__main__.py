"""`python -m eval generate (--checkpoint DIR | --hf DIR) --prompt TEXT [options]`
streams a continuation of the prompt from a `python -m train` workdir or a Hugging Face
DeepSeek directory.

`python -m eval loss --checkpoint DIR [--batches N] [--set model.precision=fp8 ...]`
prints one JSON line with the checkpoint's loss on its run's validation split.

`--set model.KEY=VALUE` changes how the model computes (precision, dtype, attn_impl,
moe_impl, remat_policy, param_dtype), never what it is.
"""

from __future__ import annotations

import argparse
import os
import sys

TASKS = ("generate", "loss")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description="Evaluate and sample dsjax models.")
    p.add_argument("task", choices=TASKS, help="what to run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a python -m train workdir (latest checkpoint)")
    src.add_argument("--hf", help="a Hugging Face DeepSeek-V2/V3 directory")
    p.add_argument("--prompt", help="generate: text to continue")
    p.add_argument("--tokenizer", default=None,
                   help="'bytes' or a tokenizer.json (default: the run's, or the HF directory's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn-impl", choices=("absorb", "naive"), default="absorb")
    p.add_argument("--batches", type=int, default=None,
                   help="loss: validation batches (default: the run's train.eval_batches)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE",
                   help="how the model computes, e.g. model.precision=fp8 or model.dtype=float32")
    return p


def _load(args):
    import dataclasses

    import dsjax
    from dsjax.checkpoint import load_trained

    if args.checkpoint:
        model, variables, run = load_trained(args.checkpoint)
        tokenizer = args.tokenizer or run.get("data", {}).get("tokenizer", "bytes")
    else:
        model, variables = dsjax.from_pretrained(args.hf)
        tokenizer = args.tokenizer or os.path.join(args.hf, "tokenizer.json")
    from dsjax.config import IMPL_FIELDS, override_model

    cfg = override_model(dataclasses.replace(model.cfg, attn_impl=args.attn_impl), args.overrides, IMPL_FIELDS)
    return dsjax.Transformer(cfg), variables, tokenizer


def _loss(args) -> int:
    import json

    from eval.loss import checkpoint_loss

    if not args.checkpoint:
        print("error: loss needs --checkpoint (a python -m train workdir: its validation split)", file=sys.stderr)
        return 2
    try:
        out = checkpoint_loss(args.checkpoint, args.batches, args.overrides, progress=True)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": args.checkpoint, **out}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.task == "loss":
        return _loss(args)
    if args.prompt is None:
        print("error: generate needs --prompt", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1 or args.temperature < 0:
        print("error: --max-new-tokens must be positive and --temperature >= 0", file=sys.stderr)
        return 2
    import jax

    from dsjax.generate import generate_stream
    from dsjax.tokenizer import load_tokenizer

    try:
        model, variables, tokenizer_spec = _load(args)
        tokenizer = load_tokenizer(tokenizer_spec)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        print("error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    stop = tuple(t for t in (tokenizer.eos_id,) if t is not None)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    emitted: list[int] = []
    shown = ""
    for token in generate_stream(model, variables, prompt, args.max_new_tokens, args.temperature,
                                 jax.random.key(args.seed), top_k=args.top_k, top_p=args.top_p, stop_tokens=stop):
        if token in stop:
            break
        emitted.append(token)
        text = tokenizer.decode(emitted)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(emitted)[len(shown):] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
