"""R1's fourth stage on the toy R1 model, in one command: a reward model learns a stated
preference, then GRPO on a mixture of task prompts (rule-based rewards) and general
prompts (the reward model, switched on part-way as R1 did).

    python -m bench r1            # first: the toy R1 (pretraining, SFT, reasoning GRPO)
    python -m examples.r1_full    # then this: about 25 minutes; prints one JSON line

The stated rule (`eval.rewards.integer_answer`): a response that thinks, then answers in
digits and ends with the closing tag (`<think>...</think><answer>123</answer>`, nothing
after) is preferred to one that rambles (no tags, words for the answer, text after the
tag, a missing tag). The general prompts are questions in words about numbers that the
toy model never saw ("Q: What is 12 plus 34? A: "); it often answers them badly formed.

1. Preference pairs: the toy R1 model samples 8 responses to each of 400 general training
   prompts; the rule labels them; pairs join a passing and a failing response to one
   prompt, plus pairs of a passing response against a written ramble. Pairs from held-out
   prompts (never trained on) measure the reward model (`rm_accuracy`).
2. `python -m train rm --init TOY_R1`: the reward model (the toy's backbone plus a head).
3. `python -m train grpo --config r1_full --init TOY_R1`: addition problems with
   accuracy + format rewards and general prompts scored by the reward model (from
   `grpo.rm_from_step`), weights 1:1.
4. Before and after: greedy accuracy on held-out addition problems, and on held-out
   general prompts the reward model's mean score and the rule's true satisfaction rate.
"""

import argparse
import hashlib
import json
import os
import random
import sys
import time

import yaml

from bench.r1 import ROOT, held_out_accuracy, train

RULE = "integer_answer"
TEMPLATES = ["Q: What is {a} plus {b}? A: ", "Q: Spell the number {a} in words. A: ",
             "Q: Name a number between {a} and {c}. A: ", "Q: What comes after {a}? A: "]
RAMBLES = ["well, let me think about it for a while", "hmm, it could be many things really",
           "that is a hard one, maybe later", "numbers are tricky, I would rather not say"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def general_prompts(split: str, n: int, seed: int) -> list[str]:
    """n distinct general prompts of `split`: a prompt is held out ('test') when its hash
    says so, so the two splits never share one."""
    rng = random.Random(f"general/{split}/{seed}")
    out: dict[str, None] = {}
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = rng.choice(TEMPLATES).format(a=a, b=b, c=a + rng.randint(2, 50))
        test = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 5 == 0
        if test == (split == "test"):
            out[prompt] = None
    return list(out)


def passes(completion: str, truncated: bool) -> bool:
    from eval import rewards

    return not truncated and rewards.get(RULE)("", completion) > 0


def rambled(good: str, rng: random.Random) -> str:
    """A response that breaks the rule, written from a passing one."""
    from eval import rewards

    answer = rewards.answer_of(good) or "7"
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice(RAMBLES)
    if kind == 1:
        words = " ".join(WORDS[int(d)] for d in answer if d.isdigit()) or "seven"
        return good.replace(f"<answer>{answer}</answer>", f"<answer>{words}</answer>")
    if kind == 2:
        return good + " " + rng.choice(RAMBLES)
    if kind == 3:
        return good.replace("</answer>", "")
    return good.split("<answer>")[0] + " " + rng.choice(RAMBLES)


def sample(workdir: str, prompts: list[str], k: int, temperature: float, seed: int, max_new_tokens: int):
    """k completions of each prompt from the workdir's model: [(prompt, text, truncated)]."""
    import dataclasses

    import jax

    from dsjax.checkpoint import load_trained
    from dsjax.tokenizer import load_tokenizer
    from eval.completions import complete, prompt_width

    model, variables, run = load_trained(workdir)
    model = model.clone(cfg=dataclasses.replace(model.cfg, attn_impl="absorb"))
    tokenizer = load_tokenizer(run["data"]["tokenizer"])
    width = prompt_width(tokenizer, prompts)
    rows = [p for p in prompts for _ in range(k)]
    out = []
    chunk = 256
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        part = part + part[:1] * (chunk - len(part))
        comp = complete(model, variables, tokenizer, part, width, max_new_tokens=max_new_tokens,
                        temperature=temperature, rng=jax.random.key(seed + start))
        n = min(chunk, len(rows) - start)
        out += [(p, t, bool(tr)) for p, t, tr in zip(part[:n], comp.texts[:n], comp.truncated[:n])]
    return out


def preference_pairs(samples, seed: int, per_prompt: int = 3) -> list[dict]:
    """Pairs (chosen passes the rule, rejected fails it) from sampled responses, and
    passing responses against written rambles."""
    rng = random.Random(seed)
    by_prompt: dict[str, tuple[list, list]] = {}
    for prompt, text, truncated in samples:
        good, bad = by_prompt.setdefault(prompt, ([], []))
        (good if passes(text, truncated) else bad).append(text)
    pairs = []
    for prompt, (good, bad) in by_prompt.items():
        if not good:
            continue
        for _ in range(min(per_prompt, len(good) * len(bad))):
            pairs.append({"prompt": prompt, "chosen": rng.choice(good), "rejected": rng.choice(bad)})
        chosen = rng.choice(good)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rambled(chosen, rng)})
    rng.shuffle(pairs)
    return pairs


def general_scores(workdir: str, prompts: list[str], rm, max_new_tokens: int) -> dict:
    """Greedy responses of the workdir's model to `prompts`: the reward model's mean score
    (`rm`: a batch reward, `train.rl.rewards.reward_model_scorer`) and the rule's
    satisfaction rate."""
    import numpy as np

    got = sample(workdir, prompts, 1, 0.0, 0, max_new_tokens)
    scores = np.asarray(rm([p for p, _, _ in got], [t for _, t, _ in got], [{}] * len(got)))
    return {"rm_score": float(scores.mean()), "rule_rate": float(np.mean([passes(t, tr) for _, t, tr in got])),
            "example": got[0][1]}


def write_jsonl(path: str, rows) -> str:
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="bench_r1",
                   help="the toy R1 run's directory (python -m bench.r1 --workdir); this run's go beside it")
    p.add_argument("--r1", default=None, help="the toy R1 workdir to start from (default: WORKDIR/grpo)")
    p.add_argument("--held-out", type=int, default=500, help="held-out addition problems")
    p.add_argument("--general-held-out", type=int, default=200, help="held-out general prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="grpo_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for the GRPO stage")
    args = p.parse_args()
    start = time.time()
    workdir = os.path.abspath(args.workdir)
    r1 = os.path.abspath(args.r1 or os.path.join(workdir, "grpo"))
    if not os.path.isdir(os.path.join(r1, "checkpoints")):
        sys.exit(f"error: no toy R1 model in {r1}: run `python -m bench.r1 --workdir {args.workdir}` first")
    with open(os.path.join(ROOT, "configs", "r1_full.yaml")) as f:
        full_cfg = yaml.safe_load(f)
    g = full_cfg["grpo"]
    task_cfg = {"task": "addition", "difficulty": 2, "max_new_tokens": g["max_new_tokens"]}
    data = os.path.join(workdir, "full_data")
    os.makedirs(data, exist_ok=True)

    # 1. General prompts and preference pairs.
    train_prompts = general_prompts("train", 1000, args.seed)
    test_prompts = general_prompts("test", args.general_held_out, args.seed)
    general = write_jsonl(os.path.join(data, "general.jsonl"), ({"prompt": q} for q in train_prompts))
    pairs_path, test_pairs_path = os.path.join(data, "pairs.jsonl"), os.path.join(data, "pairs_test.jsonl")
    t0 = time.time()
    cached = os.path.exists(test_pairs_path)
    if not cached:
        rm_prompts = train_prompts[:400]
        write_jsonl(pairs_path, preference_pairs(sample(r1, rm_prompts, 8, 1.0, args.seed, g["max_new_tokens"]),
                                                 args.seed))
        write_jsonl(test_pairs_path, preference_pairs(sample(r1, test_prompts, 8, 1.0, args.seed + 1,
                                                             g["max_new_tokens"]), args.seed + 1))
    pairs_s = time.time() - t0
    n_pairs = sum(1 for _ in open(pairs_path))

    # 2. The reward model.
    rm_dir = os.path.join(workdir, "rm")
    rm_wall = train("rm", "r1_rm", rm_dir, f"data.source={pairs_path}", init=r1)
    from train.rl.rewards import reward_model_scorer

    score = reward_model_scorer(rm_dir)
    test_pairs = [json.loads(line) for line in open(test_pairs_path)]
    prompts = [q["prompt"] for q in test_pairs]
    chosen = score(prompts, [q["chosen"] for q in test_pairs], [{}] * len(test_pairs))
    rejected = score(prompts, [q["rejected"] for q in test_pairs], [{}] * len(test_pairs))
    rm_accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(test_pairs)
    print(f"reward model: held-out pairwise accuracy {rm_accuracy:.3f} on {len(test_pairs)} pairs",
          file=sys.stderr)

    # 3. Full-scenario GRPO from the toy R1 model; 4. before and after.
    task_before = held_out_accuracy(r1, task_cfg, args.held_out)
    general_before = general_scores(r1, test_prompts, score, g["max_new_tokens"])
    print(f"before: task accuracy {task_before['accuracy']:.3f}; general prompts: rule rate "
          f"{general_before['rule_rate']:.3f}, reward-model score {general_before['rm_score']:.3f}", file=sys.stderr)
    grpo_dir = os.path.join(workdir, "grpo_full")
    sources = (f"grpo.sources=[{{task: addition, difficulty: 2, rewards: 'accuracy:1,format:0.1', weight: 1}}, "
               f"{{name: general, prompts: {general}, rewards: 'helpful:1', weight: 1}}]")
    grpo_wall = train("grpo", "r1_full", grpo_dir, sources, f"grpo.reward_models=helpful={rm_dir}",
                      *args.grpo_sets, init=r1)
    task_after = held_out_accuracy(grpo_dir, task_cfg, args.held_out)
    general_after = general_scores(grpo_dir, test_prompts, score, g["max_new_tokens"])
    records = [json.loads(line) for line in open(os.path.join(grpo_dir, "metrics.jsonl"))]
    guard = [r["general/rm_high_rule_fail"] for r in records if "general/rm_high_rule_fail" in r]
    print(f"after: task accuracy {task_after['accuracy']:.3f}; general prompts: rule rate "
          f"{general_after['rule_rate']:.3f}, reward-model score {general_after['rm_score']:.3f}; "
          f"e.g. {general_after['example']!r}", file=sys.stderr)
    out = {
        "name": "r1_full", "preference_pairs": n_pairs, "held_out_pairs": len(test_pairs),
        "rm_accuracy": round(rm_accuracy, 4),
        "task_accuracy_before": round(task_before["accuracy"], 4),
        "task_accuracy_after": round(task_after["accuracy"], 4),
        "rm_score_before": round(general_before["rm_score"], 4), "rm_score_after": round(general_after["rm_score"], 4),
        "rule_rate_before": round(general_before["rule_rate"], 4),
        "rule_rate_after": round(general_after["rule_rate"], 4),
        "hack_share_last": round(guard[-1], 4) if guard else None,
        "grpo_steps": max(r["step"] for r in records), "rm_from_step": g.get("rm_from_step", 0),
        "pairs_s": round(pairs_s, 1), "pairs_cached": cached, "rm_wall_s": round(rm_wall, 1), "grpo_wall_s": round(grpo_wall, 1),
        "wall_s": round(time.time() - start, 1)}
    out["targets_met"] = (out["rm_accuracy"] >= 0.9
                          and out["task_accuracy_after"] >= out["task_accuracy_before"] - 0.02
                          and out["rm_score_after"] > out["rm_score_before"]
                          and out["rule_rate_after"] > out["rule_rate_before"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
