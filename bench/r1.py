"""A toy DeepSeek-R1 on a 2-core CPU, in one command: pretraining on generated arithmetic,
cold-start SFT on a few hundred formatted examples, then GRPO with rule-based rewards;
or R1-Zero in miniature: the same GRPO straight from the pretrained model.

    python -m bench r1                      # seed 0 in bench_r1/; prints one JSON line
    python -m bench.r1 --seed 1             # data seed and every stage's train.seed; bench_r1_seed1/
    python -m bench.r1 --seed 1 --zero      # R1-Zero: GRPO from bench_r1_seed1/pretrain, no SFT
    python -m bench.r1 --control            # the same GRPO schedule with a random accuracy reward
    python -m bench.r1 --plot-docs docs/r1_zero.png   # R1-Zero beside R1, seeds 1-3 (no training)
    python -m bench.r1 --seed 1 --probe     # what seed 1's pretrained model brings (no training)

docs/r1.md has the measured figures and wall times. Each stage is `python -m train` with
a run config from configs/ (r1_pretrain, r1_sft, r1, r1_zero), in its own workdir under
--workdir, so a second invocation (e.g. --control or --zero) reuses the finished
pretraining and SFT runs; a workdir holds one seed's runs. The greedy accuracy on
held-out problems is measured on the starting model (`start_accuracy`: the SFT model, or
the pretrained one with --zero) and after GRPO (`end_accuracy`), with the format rates,
the greedy completion lengths, the GRPO steps, the wall time and `rollout_share` (the
fraction of the GRPO run spent generating rollouts).
"""

import argparse
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file, python bench/r1.py: the repository's packages first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The generated pretraining corpus: documents about training-split problems, mixing the
# bare answer, the worked solution in plain text and the tagged solution after the prompt.
CORPUS = {"problems": 3000, "documents": 60_000, "mix": {"work": 0.55, "answer": 0.25, "solution": 0.20}}
SFT_EXAMPLES = 500
BRIEF_SHARE = 0.55  # cold-start examples that answer after a brief think, without the steps


def write_data(directory: str, grpo_cfg: dict, corpus: dict, sft_examples: int, seed: int) -> tuple[str, str]:
    """The pretraining corpus (JSONL, one document per line) and the cold-start SFT set,
    both from the task's training split."""
    import random

    from eval import tasks

    os.makedirs(directory, exist_ok=True)
    task = tasks.get(grpo_cfg["task"], grpo_cfg["difficulty"], template=grpo_cfg.get("template", "short"))
    corpus_path, sft_path = os.path.join(directory, "corpus.jsonl"), os.path.join(directory, "sft.jsonl")
    if not os.path.exists(corpus_path):
        problems = task.split("train", corpus["problems"], seed=seed)
        kinds = [(k, w) for k, w in corpus["mix"].items()]
        rng = random.Random(seed)
        with open(corpus_path + ".tmp", "w") as f:
            for _ in range(corpus["documents"]):
                kind = rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
                f.write(json.dumps({"text": rng.choice(problems).document(kind)}) + "\n")
        os.replace(corpus_path + ".tmp", corpus_path)
    if not os.path.exists(sft_path):
        problems = task.split("train", sft_examples, seed=seed + 1)
        rng = random.Random(seed + 1)
        with open(sft_path + ".tmp", "w") as f:
            for p in problems:
                response = p.brief_solution if rng.random() < BRIEF_SHARE else p.solution
                f.write(json.dumps({"prompt": p.prompt, "response": response}) + "\n")
        os.replace(sft_path + ".tmp", sft_path)
    return corpus_path, sft_path


def train(stage: str, config: str, workdir: str, *sets: str, init: str | None = None) -> float:
    """Runs one `python -m train` stage (resuming or skipping a finished one); its wall time."""
    cmd = [sys.executable, "-m", "train", stage, "--config", config, "--workdir", workdir]
    if init:
        cmd += ["--init", init]
    for s in sets:
        cmd += ["--set", s]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr)
    if done.returncode:
        sys.exit(f"error: {stage} failed with status {done.returncode}")
    return time.time() - start


def _held_out(workdir: str, grpo_cfg: dict, n: int):
    """The workdir's latest checkpoint (decoding with absorbed MLA), its tokenizer, and n
    test problems of `grpo_cfg`'s task in its template."""
    import dataclasses

    from dsjax.checkpoint import load_trained
    from dsjax.tokenizer import load_tokenizer
    from eval import tasks

    model, variables, run = load_trained(workdir)
    model = model.clone(cfg=dataclasses.replace(model.cfg, attn_impl="absorb"))
    task = tasks.get(grpo_cfg["task"], grpo_cfg["difficulty"], template=grpo_cfg.get("template", "short"))
    return model, variables, load_tokenizer(run["data"]["tokenizer"]), task.split("test", n, seed=0)


def held_out_accuracy(workdir: str, grpo_cfg: dict, n: int) -> dict:
    """Greedy accuracy, format rate and completion length of the workdir's latest checkpoint
    on n test problems, in the template of `grpo_cfg`."""
    from eval import reasoning

    model, variables, tokenizer, problems = _held_out(workdir, grpo_cfg, n)
    return reasoning.evaluate(model, variables, tokenizer, problems, max_new_tokens=grpo_cfg["max_new_tokens"],
                              batch_size=250)


def probe_pretrained(workdir: str, grpo_cfg: dict, n: int) -> dict:
    """What the pretrained model (the workdir's latest checkpoint) brings to R1, greedy on
    n held-out problems: `restates_question`, the share that continue `prompt<think>` with
    the worked solution's opening (the restated question, '51+44:'), which only the tagged
    documents teach; `worked_solution`, the share that continue that opening with the
    whole worked solution, right."""
    from eval.completions import complete, prompt_width

    model, variables, tokenizer, problems = _held_out(workdir, grpo_cfg, n)
    openings = [p.work.split(":", 1)[0] + ":" for p in problems]
    prompts = [p.prompt + "<think>" for p in problems]
    restated = complete(model, variables, tokenizer, prompts, prompt_width(tokenizer, prompts),
                        max_new_tokens=max(len(tokenizer.encode(o)) for o in openings)).texts
    worked = complete(model, variables, tokenizer, openings, prompt_width(tokenizer, openings),
                      max_new_tokens=grpo_cfg["max_new_tokens"]).texts
    return {"restates_question": sum(t.startswith(o) for t, o in zip(restated, openings)) / n,
            "worked_solution": sum((o + t).strip() == p.work for p, o, t in zip(problems, openings, worked)) / n}


def default_workdir(seed: int) -> str:
    """bench_r1 for seed 0, bench_r1_seed<S> for another seed."""
    return "bench_r1" if seed == 0 else f"bench_r1_seed{seed}"


def claim_workdir(workdir: str, seed: int) -> None:
    """Records the seed in WORKDIR/seed; exits with a message when the workdir holds the
    runs of another seed (its finished stages would otherwise be reused)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "seed")
    if os.path.exists(path):
        with open(path) as f:
            have = int(f.read())
        if have != seed:
            sys.exit(f"error: {workdir} holds the runs of --seed {have}, not {seed}; pass another --workdir")
        return
    with open(path, "w") as f:
        f.write(f"{seed}\n")


def load_config(name: str) -> dict:
    with open(os.path.join(ROOT, "configs", f"{name}.yaml")) as f:
        return yaml.safe_load(f)


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_docs(path: str, seeds: list[int]) -> str:
    """Draws R1-Zero's runs (`grpo_zero`) beside the cold-start R1 runs (`grpo`) of each
    seed's default workdir: held-out greedy accuracy and format rate at the eval steps,
    the rollouts' format rate and mean completion length at every step. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(f"R1-Zero, seed {s}", os.path.join(default_workdir(s), "grpo_zero"), "C0", style)
            for s, style in zip(seeds, ("-", "--", ":", "-."))]
    runs += [(f"R1 (cold start), seed {s}", os.path.join(default_workdir(s), "grpo"), "C1", style)
             for s, style in zip(seeds, ("-", "--", ":", "-."))]
    for _, workdir, _, _ in runs:
        if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            sys.exit(f"error: {workdir} has no metrics.jsonl: run python -m bench.r1 (--zero) for its seed first")
    panels = [("held-out accuracy (greedy, 200 problems)", "test_accuracy", "o"),
              ("held-out format rate (greedy)", "test_format_rate", "o"),
              ("rollout format rate", "format_rate", None),
              ("rollout completion length (tokens)", "completion_len", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (title, key, marker) in zip(axes, panels):
        for label, workdir, color, style in runs:
            points = [(r["step"], r[key]) for r in read_metrics(workdir) if key in r]
            ax.plot(*zip(*points), linestyle=style, marker=marker, color=color, label=label)
        ax.set_xlabel("GRPO step")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="where the stages' workdirs and data go (default: bench_r1 for seed 0, "
                   "bench_r1_seed<S> for another)")
    p.add_argument("--zero", action="store_true",
                   help="R1-Zero: GRPO straight from the pretrained model (configs/r1_zero.yaml), no SFT")
    p.add_argument("--control", action="store_true",
                   help="replace the accuracy reward by a random one (same schedule): the gain must vanish")
    p.add_argument("--held-out", type=int, default=500, help="test problems for start/end accuracy")
    p.add_argument("--seed", type=int, default=0, help="the data seed and every stage's train.seed")
    p.add_argument("--set", dest="grpo_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for the GRPO stage")
    p.add_argument("--plot-docs", metavar="PNG", help="draw the R1-Zero and R1 GRPO curves of --plot-seeds "
                   "(their default workdirs) into PNG and exit")
    p.add_argument("--plot-seeds", default="1,2,3", help="comma-separated seeds for --plot-docs")
    p.add_argument("--probe", action="store_true", help="probe the seed's pretrained model (no training): does "
                   "it restate the question and write the worked solution; one JSON line")
    args = p.parse_args()
    if args.plot_docs:
        print(plot_docs(args.plot_docs, [int(s) for s in args.plot_seeds.split(",")]))
        return 0
    if args.probe:
        pretrain = os.path.join(os.path.abspath(args.workdir or default_workdir(args.seed)), "pretrain")
        if not os.path.exists(os.path.join(pretrain, "metrics.jsonl")):
            sys.exit(f"error: {pretrain} holds no pretraining run: run python -m bench.r1 --seed {args.seed} first")
        figures = probe_pretrained(pretrain, load_config("r1")["grpo"], args.held_out)
        print(json.dumps({"seed": args.seed, "held_out": args.held_out, **figures}))
        return 0
    start = time.time()
    grpo_cfg = load_config("r1_zero" if args.zero else "r1")["grpo"]
    workdir = os.path.abspath(args.workdir or default_workdir(args.seed))
    claim_workdir(workdir, args.seed)
    seed = f"train.seed={args.seed}"
    # The corpus and the cold-start set are R1's (its task, in its short template) either way.
    corpus, sft_data = write_data(os.path.join(workdir, "data"), load_config("r1")["grpo"], CORPUS,
                                  SFT_EXAMPLES, args.seed)
    pretrain = os.path.join(workdir, "pretrain")
    train("pretrain", "r1_pretrain", pretrain, f"data.source={corpus}", seed)
    if args.zero:
        start_dir, grpo_dir = pretrain, os.path.join(workdir, "grpo_zero_control" if args.control else "grpo_zero")
    else:
        start_dir, grpo_dir = os.path.join(workdir, "sft"), os.path.join(workdir, "grpo_control" if args.control
                                                                         else "grpo")
        train("sft", "r1_sft", start_dir, f"data.source={sft_data}", seed, init=pretrain)
    before = held_out_accuracy(start_dir, grpo_cfg, args.held_out)
    print(f"{'pretrained' if args.zero else 'SFT'} model: held-out greedy accuracy {before['accuracy']:.3f}, "
          f"format {before['format_rate']:.3f}", file=sys.stderr)
    sets = [seed, *args.grpo_sets]
    if args.control:
        rewards = grpo_cfg["rewards"].replace("accuracy", "random")
        sets.append(f"grpo.rewards={rewards}")
    grpo_wall = train("grpo", "r1_zero" if args.zero else "r1", grpo_dir, *sets, init=start_dir)
    after = held_out_accuracy(grpo_dir, grpo_cfg, args.held_out)
    records = read_metrics(grpo_dir)
    rollout = sum(r.get("rollout_s", 0.0) for r in records)
    val = [r["val_loss"] for r in read_metrics(pretrain) if "val_loss" in r]
    print(json.dumps({
        "zero": args.zero, "control": args.control, "seed": args.seed,
        "task": f"{grpo_cfg['task']}:{grpo_cfg['difficulty']}", "template": grpo_cfg.get("template", "short"),
        "held_out": args.held_out, "start_accuracy": round(before["accuracy"], 4),
        "end_accuracy": round(after["accuracy"], 4), "gain": round(after["accuracy"] - before["accuracy"], 4),
        "start_format_rate": round(before["format_rate"], 4), "format_rate": round(after["format_rate"], 4),
        "completion_len_start": round(before["completion_len"], 1),
        "completion_len_end": round(after["completion_len"], 1),
        "pretrain_val_loss": round(val[-1], 4), "steps": max(r["step"] for r in records),
        "wall_s": round(time.time() - start, 1), "grpo_wall_s": round(grpo_wall, 1),
        "rollout_share": round(rollout / max(grpo_wall, 1e-9), 3),
        "final_train_reward": round(records[-1]["reward_mean"], 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
