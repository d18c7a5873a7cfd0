"""`python -m eval generate (--checkpoint DIR | --hf DIR) --prompt TEXT [options]`
streams a continuation of the prompt from a `python -m train` workdir or a Hugging Face
DeepSeek directory.

`python -m eval loss --checkpoint DIR [--batches N] [--set model.precision=fp8 ...]`
prints one JSON line with the checkpoint's loss on its run's validation split.

`python -m eval tasks (--checkpoint DIR | --hf DIR) --task NAME[:DIFFICULTY][,...]
[--split test] [--problems N] [--samples K] [--temperature 0.6] [--top-p 0.95] [--out FILE]`
scores reasoning as DeepSeek-R1 does: pass@1 over K samples, pass@k (unbiased), maj@K,
format rate, lengths and tokens/s; one JSON line per task and a table.

`python -m eval reject ... --split train --out SFT.jsonl [--shortest]` is rejection
sampling: it keeps the correct, well-formed samples as `python -m train sft` JSONL and
reports the acceptance rate per task.

`python -m eval generate ... --chat --prompt TEXT` sends the prompt as a user message,
rendered by the tokenizer's chat template (else as dsjax's plain SFT format
`User: TEXT\nAssistant: `), and prints the reply.

`python -m eval export --checkpoint DIR --out HF_DIR [--overwrite] [--tokenizer T]`
writes the run's latest checkpoint as a Hugging Face folder (weights, config.json, the
run's tokenizer and chat template; a reward model's head beside them) that transformers'
AutoModelForCausalLM and AutoTokenizer load (eval/export.py).

Bad input exits 2 with one `error:` line.

`--set model.KEY=VALUE` changes how the model computes (precision, dtype, attn_impl,
moe_impl, remat_policy, param_dtype), never what it is.
"""

from __future__ import annotations

import argparse
import os
import sys

TASKS = ("generate", "loss", "tasks", "reject", "export")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description="Evaluate and sample dsjax models.")
    p.add_argument("task_name", metavar="task", choices=TASKS, help="what to run: " + ", ".join(TASKS))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a python -m train workdir (latest checkpoint)")
    src.add_argument("--hf", help="a Hugging Face DeepSeek-V2/V3 directory")
    p.add_argument("--prompt", help="generate: text to continue")
    p.add_argument("--chat", action="store_true",
                   help="generate: the prompt is a user message, rendered by the tokenizer's chat template")
    p.add_argument("--tokenizer", default=None,
                   help="'bytes' or a tokenizer.json (default: the run's, or the HF directory's); "
                        "export: the one to write")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to sample per completion (default: generate 128; tasks/reject the "
                        "run's grpo.max_new_tokens, else 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy (default: generate 0, tasks/reject 0.6 as R1)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (default: 0, all)")
    p.add_argument("--top-p", type=float, default=None, help="default: generate 1.0, tasks/reject 0.95 as R1")
    p.add_argument("--task", default=None,
                   help="tasks/reject: NAME[:DIFFICULTY] (comma-separated for several; default: the run's grpo task)")
    p.add_argument("--template", default=None, help="tasks/reject: prompt template (default: the run's, else 'r1')")
    p.add_argument("--split", choices=("train", "test"), default=None,
                   help="tasks/reject: problems from this split (default: tasks test, reject train)")
    p.add_argument("--problems", type=int, default=500, help="tasks/reject: problems per task (default: 500)")
    p.add_argument("--samples", type=int, default=None, help="tasks/reject: completions per problem (default 4 / 8)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="tasks/reject: completions per generate call (default: 256)")
    p.add_argument("--speculative", action="store_true", help="tasks/reject: draft with the MTP module")
    p.add_argument("--out", default=None,
                   help="tasks: JSONL of every completion with its rewards; reject: the SFT JSONL to write; "
                        "export: the Hugging Face folder to write")
    p.add_argument("--overwrite", action="store_true", help="export: replace an export in a non-empty --out")
    p.add_argument("--shortest", action="store_true", help="reject: keep only the shortest passing sample per problem")
    p.add_argument("--no-dedup", action="store_true", help="reject: keep repeated (prompt, completion) pairs")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--attn-impl", choices=("absorb", "naive"), default="absorb",
                   help="MLA form for decoding (default: absorb, the latent cache)")
    p.add_argument("--batches", type=int, default=None,
                   help="loss: validation batches (default: the run's train.eval_batches)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE",
                   help="how the model computes, e.g. model.precision=fp8 or model.dtype=float32")
    return p


def sampling_defaults(run: dict, task: str | None = None, template: str | None = None,
                      max_new_tokens: int | None = None) -> tuple[str | None, str, int]:
    """What to sample a checkpoint on: (task spec NAME:DIFFICULTY, prompt template, tokens
    per completion), each as given, else as the run's `grpo` section trained it, else
    (None, 'r1', 256).

    Args:
      run: the run config of the checkpoint's directory (dsjax.checkpoint.read_run_config;
        {} for a Hugging Face directory).
    """
    grpo = run.get("grpo") or {}
    spec = task or (f"{grpo['task']}:{grpo['difficulty']}" if grpo.get("task") else None)
    return spec, template or grpo.get("template", "r1"), int(max_new_tokens or grpo.get("max_new_tokens", 256))


def error(e: BaseException) -> int:
    """Prints `e` as one `error:` line and returns the exit status 2. An OSError shows its
    message and file name (its args start with the errno)."""
    if isinstance(e, OSError) and e.strerror:
        message = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        message = e.args[0] if e.args else (str(e) or type(e).__name__)
    print("error: " + " ".join(str(message).splitlines()), file=sys.stderr)
    return 2


def check_hf_folder(path: str) -> None:
    """Refuses (FileNotFoundError) a --hf that is not a Hugging Face folder, with the hint
    to pass a run directory as --checkpoint."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    if os.path.isfile(os.path.join(path, "config.yaml")):
        raise FileNotFoundError(f"--hf expects a Hugging Face folder (config.json and *.safetensors); {path} is "
                                f"a python -m train run directory: use --checkpoint {path}")
    what = "has no config.json" if os.path.isdir(path) else "does not exist"
    raise FileNotFoundError(f"--hf expects a Hugging Face folder (config.json and *.safetensors): {path} {what} "
                            "(for a python -m train run directory use --checkpoint WORKDIR)")


def _load(args):
    import dataclasses

    import dsjax
    from dsjax.checkpoint import load_trained

    if args.checkpoint:
        model, variables, run = load_trained(args.checkpoint)
        tokenizer = args.tokenizer or run.get("data", {}).get("tokenizer", "bytes")
    else:
        check_hf_folder(args.hf)
        model, variables = dsjax.from_pretrained(args.hf)
        tokenizer = args.tokenizer or os.path.join(args.hf, "tokenizer.json")
    from eval.loss import with_implementation

    cfg = with_implementation(dataclasses.replace(model.cfg, attn_impl=args.attn_impl), args.overrides)
    return dsjax.Transformer(cfg), variables, tokenizer


def _loss(args) -> int:
    import json

    from eval.loss import checkpoint_loss

    if not args.checkpoint:
        print("error: loss needs --checkpoint (a python -m train workdir: its validation split)", file=sys.stderr)
        return 2
    try:
        out = checkpoint_loss(args.checkpoint, args.batches, args.overrides, progress=True)
    except (OSError, KeyError, ValueError) as e:
        return error(e)
    print(json.dumps({"checkpoint": args.checkpoint, **out}))
    return 0


def reasoning(args) -> int:
    """`tasks` (evaluation) and `reject` (rejection sampling into SFT JSONL)."""
    import json

    rejecting = args.task_name == "reject"
    samples = args.samples if args.samples is not None else (8 if rejecting else 4)
    temperature = 0.6 if args.temperature is None else args.temperature
    top_p = 0.95 if args.top_p is None else args.top_p
    if samples < 1 or args.problems < 1:
        print(f"error: --samples and --problems must be at least 1, got {samples} and {args.problems}",
              file=sys.stderr)
        return 2
    if temperature < 0 or not 0 < top_p <= 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        print("error: --temperature must be >= 0, --top-p in (0, 1] and --max-new-tokens positive", file=sys.stderr)
        return 2
    if rejecting and not args.out:
        print("error: reject needs --out FILE.jsonl (the SFT data to write)", file=sys.stderr)
        return 2
    from eval import reasoning as rs
    from eval import tasks as tasks_lib

    from dsjax.checkpoint import read_run_config

    try:
        run = read_run_config(args.checkpoint) if args.checkpoint else {}
        spec, template, max_new = sampling_defaults(run, args.task, args.template, args.max_new_tokens)
        if not spec:
            raise ValueError("--task NAME[:DIFFICULTY] is needed (this checkpoint names no grpo task); "
                             f"tasks: {tasks_lib.names()}")
        chosen = tasks_lib.parse_spec(spec, template)
        model, variables, tokenizer_spec = _load(args)
        from dsjax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_spec)
    except (OSError, KeyError, ValueError) as e:
        return error(e)
    split = args.split or ("train" if rejecting else "test")
    rows, kept_all, records = {}, [], []
    for name, task in chosen:
        problems = task.split(split, args.problems, seed=args.seed)
        groups, timing = rs.sample_problems(model, variables, tokenizer, problems, samples=samples,
                                            max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                                            top_k=args.top_k, batch_size=args.batch_size, seed=args.seed,
                                            speculative=args.speculative, progress=True)
        row = rs.report(groups, timing)
        if rejecting:
            kept = rs.accepted(groups, shortest=args.shortest, dedup=not args.no_dedup)
            kept_all += kept
            row.update(acceptance=len(rs.accepted(groups, dedup=False)) / (len(problems) * samples),
                       problems_covered=sum(any(s.correct and s.well_formed for s in g) for g in groups) / len(problems),
                       kept=len(kept))
        elif args.out:
            records.append(groups)
        rows[name] = row
        print(json.dumps({"task": name, "split": split, "temperature": temperature, "top_p": top_p,
                          "max_new_tokens": max_new, **{k: round(v, 4) if isinstance(v, float) else v
                                                        for k, v in row.items()}}), flush=True)
    if rejecting:
        rs.write_sft(kept_all, args.out)
        print(f"wrote {len(kept_all)} SFT examples to {args.out}", file=sys.stderr)
    elif args.out:
        rs.write_samples([g for groups in records for g in groups], args.out)
        print(f"wrote {sum(len(g) for groups in records for g in groups)} completions to {args.out}", file=sys.stderr)
    rs.print_table(rows)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def show_stream(tokens, decode, stop: tuple[int, ...], write) -> int:
    """Writes a streamed continuation as it comes: a multi-byte character once whole,
    whitespace once text follows it, so a completion that ends in a run of spaces or
    newlines (as a small greedy model's often does) ends the line instead; then a newline.

    Args:
      tokens: iterable of token ids; stops at the first one in `stop`.
      decode: token ids -> text.
      write: called with each new piece of text.
    Returns:
      how many trailing whitespace characters were left out.
    """
    emitted: list[int] = []
    shown = ""
    for token in tokens:
        if token in stop:
            break
        emitted.append(token)
        text = decode(emitted)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            continue
        ready = text.rstrip()
        if len(ready) > len(shown):
            write(text[len(shown):len(ready)])
            shown = ready
    rest = decode(emitted)[len(shown):]
    write(rest.rstrip() + "\n")
    return len(rest) - len(rest.rstrip())


def _export(args) -> int:
    import json

    from eval.export import export_run

    if not args.checkpoint:
        print("error: export needs --checkpoint WORKDIR (a python -m train run directory); "
              "a --hf folder is already in the Hugging Face format", file=sys.stderr)
        return 2
    if not args.out:
        print("error: export needs --out DIR (the Hugging Face folder to write)", file=sys.stderr)
        return 2
    try:
        out = export_run(args.checkpoint, args.out, overwrite=args.overwrite, tokenizer=args.tokenizer)
    except (OSError, KeyError, ValueError) as e:
        return error(e)
    print(json.dumps(out))
    return 0


def chat_prompt(tokenizer, text: str) -> str:
    """`text` as a user message followed by what opens the assistant's reply: the
    tokenizer's chat template with its generation prompt, else dsjax's plain SFT format."""
    message = [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(message, add_generation_prompt=True)
    return f"User: {text}\nAssistant: "


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.task_name == "loss":
        return _loss(args)
    if args.task_name == "export":
        return _export(args)
    if args.task_name in ("tasks", "reject"):
        return reasoning(args)
    args.max_new_tokens = args.max_new_tokens or 128
    args.temperature = args.temperature or 0.0
    args.top_p = 1.0 if args.top_p is None else args.top_p
    if args.prompt is None:
        print("error: generate needs --prompt", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1 or args.temperature < 0:
        print("error: --max-new-tokens must be positive and --temperature >= 0", file=sys.stderr)
        return 2
    import jax

    from dsjax.decoding import generate_stream
    from dsjax.tokenizer import load_tokenizer

    try:
        model, variables, tokenizer_spec = _load(args)
        tokenizer = load_tokenizer(tokenizer_spec)
        text = chat_prompt(tokenizer, args.prompt) if args.chat else args.prompt
    except (OSError, KeyError, ValueError) as e:
        return error(e)
    prompt = tokenizer.encode(text)
    if len(prompt) == 0:
        print("error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    stop = tuple(t for t in (tokenizer.eos_id,) if t is not None)
    try:
        tokens = generate_stream(model, variables, prompt, args.max_new_tokens, args.temperature,
                                 jax.random.key(args.seed), top_k=args.top_k, top_p=args.top_p, stop_tokens=stop)
    except ValueError as e:
        return error(e)
    if not args.chat:  # a chat shows the reply only
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    hidden = show_stream(tokens, tokenizer.decode, stop, _write)
    if hidden:
        print(f"[{hidden} trailing whitespace characters not shown]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
