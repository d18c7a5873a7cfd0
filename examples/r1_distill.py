"""R1-Distill in miniature, continuing the toy R1 run of bench/r1.py (run first if absent):
rejection-sample the GRPO model on the training split, distill into a dense student with
under a quarter of its parameters, and compare with the same student trained by SFT on
the cold-start data alone.

    python -m examples.r1_distill       # prints one JSON line

Stages (each `python -m train` in its own workdir under --workdir, reused when finished):
the student (`tiny-dense`, 0.43M parameters against the teacher's 1.79M) is pretrained on
the same generated corpus (configs/r1_pretrain, as R1-Distill started from base models);
`distill` samples the teacher (configs/r1_distill: 2000 training problems x 4 at
temperature 0.6, the shortest correct completion of each kept) and fine-tunes the
student on it; `coldstart` fine-tunes the same pretrained student with the same schedule
on the 500 cold-start examples instead. Teacher and students are scored as R1 reports:
pass@1 over 8 samples at temperature 0.6 / top-p 0.95 and maj@8, on held-out problems.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import yaml

from bench.r1 import ROOT, train

STUDENT = "tiny-dense"


def score(workdir: str, task: str, difficulty: int, problems: int, samples: int, max_new_tokens: int) -> dict:
    """pass@1, maj@K, format rate and lengths of a workdir's model on held-out problems."""
    from dsjax.checkpoint import load_trained
    from dsjax.tokenizer import load_tokenizer
    from eval import reasoning, tasks

    model, variables, run = load_trained(workdir)
    model = model.clone(cfg=model.cfg.replace(attn_impl="absorb"))
    held_out = tasks.get(task, difficulty, template="short").split("test", problems, seed=0)
    groups, timing = reasoning.sample_problems(model, variables, load_tokenizer(run["data"]["tokenizer"]), held_out,
                                               samples=samples, max_new_tokens=max_new_tokens, temperature=0.6,
                                               top_p=0.95, batch_size=500, seed=0, progress=True)
    return reasoning.report(groups, timing)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="bench_r1", help="the toy R1 run's directory (python -m bench.r1 --workdir)")
    p.add_argument("--held-out", type=int, default=500, help="held-out problems")
    p.add_argument("--samples", type=int, default=8, help="samples per problem (pass@1 and maj@K)")
    args = p.parse_args()
    start = time.time()
    workdir = os.path.abspath(args.workdir)
    teacher = os.path.join(workdir, "grpo")
    if not os.path.exists(os.path.join(teacher, "metrics.jsonl")):
        print("the toy R1 run is missing: running python -m bench.r1 first", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "bench.r1", "--workdir", workdir], cwd=ROOT, stdout=sys.stderr)
        if done.returncode:
            sys.exit(f"error: python -m bench.r1 failed with status {done.returncode}")
    with open(os.path.join(ROOT, "configs", "r1.yaml")) as f:
        grpo = yaml.safe_load(f)["grpo"]
    corpus = os.path.join(workdir, "data", "corpus.jsonl")
    student_base = os.path.join(workdir, "student_pretrain")
    train("pretrain", "r1_pretrain", student_base, f"data.source={corpus}", f"model.preset={STUDENT}")
    distill_dir = os.path.join(workdir, "distill")
    distill_wall = train("distill", "r1_distill", distill_dir, f"distill.teacher={teacher}", init=student_base)
    coldstart_dir = os.path.join(workdir, "distill_coldstart")
    train("distill", "r1_distill", coldstart_dir, f"distill.data={os.path.join(workdir, 'data', 'sft.jsonl')}",
          init=student_base)

    from dsjax.config import config_from_dict, param_counts

    def params(wd):
        with open(os.path.join(wd, "config.yaml")) as f:
            return param_counts(config_from_dict(yaml.safe_load(f)["model"]))["total"]

    results = {}
    for name, wd in (("teacher", teacher), ("student", distill_dir), ("coldstart", coldstart_dir)):
        print(f"scoring {name} ({wd})", file=sys.stderr, flush=True)
        results[name] = score(wd, grpo["task"], grpo["difficulty"], args.held_out, args.samples,
                              grpo["max_new_tokens"])
    with open(os.path.join(distill_dir, "rejection.json")) as f:
        rejection = json.load(f)
    (task_stats,) = rejection.values()
    k = f"maj@{args.samples}"
    line = {"task": f"{grpo['task']}:{grpo['difficulty']}", "held_out": args.held_out, "samples": args.samples,
            "teacher_params": params(teacher), "student_params": params(distill_dir)}
    for name, r in results.items():
        line[f"{name}_pass@1"] = round(r["pass@1"], 4)
        line[f"{name}_{k}"] = round(r[k], 4)
        line[f"{name}_format_rate"] = round(r["format_rate"], 4)
    line["student_over_teacher"] = round(results["student"]["pass@1"] / max(results["teacher"]["pass@1"], 1e-9), 3)
    line["acceptance"] = round(task_stats["acceptance"], 4)
    line["distill_examples"] = task_stats["kept"]
    line["distill_wall_s"] = round(distill_wall, 1)
    line["wall_s"] = round(time.time() - start, 1)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
