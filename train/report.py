"""Run outputs: metrics.jsonl (one JSON object per logged step), its scalars mirrored to
TensorBoard event files (tensorboard/) and optionally Weights & Biases, and plots/ (loss
curves)."""

from __future__ import annotations

import json
import math
import numbers
import os

TENSORBOARD = "tensorboard"


class MetricsLog:
    """Appends records to `workdir/metrics.jsonl`; on resume, drops records past the
    restored step so the file reads as one uninterrupted run.

    Every number of a record but `step` is also a scalar at that step, under the same name
    (`reward/accuracy` is tag `accuracy` in TensorBoard's group `reward`): in TensorBoard
    event files under `workdir/tensorboard/` (`logging.tensorboard`; a restarted run's
    file opens with a purge marker at the restored step + 1, so TensorBoard drops the
    earlier attempt's points from there on) and in a Weights & Biases run
    (`logging.wandb`; one W&B run per launch, named and grouped by `logging.wandb_name`
    or the workdir's basename).

    Args:
      workdir: the run directory.
      resume_step: the restored checkpoint's step (None: a fresh run, which keeps nothing).
      logging: a train.config.LoggingConfig (None: metrics.jsonl only).
      config: the run config as a mapping, recorded with the W&B run.
    """

    def __init__(self, workdir: str, resume_step: int | None, logging=None, config: dict | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a kill
                    if resume_step is not None and rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            with open(self.path, "w") as f:
                f.writelines(kept)
        self._tensorboard = self._wandb = None
        if logging is not None and logging.tensorboard:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(os.path.join(workdir, TENSORBOARD),
                                              purge_step=0 if resume_step is None else resume_step + 1)
        if logging is not None and logging.wandb:
            import wandb

            name = logging.wandb_name or os.path.basename(os.path.abspath(workdir))
            self._wandb = wandb.init(project=logging.wandb_project, entity=logging.wandb_entity or None,
                                     name=name, group=name, dir=workdir, config=config)

    def write(self, record: dict) -> None:
        """Appends `record` ({'step': int, name: value, ...}) and mirrors its numbers."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = int(record["step"])
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, numbers.Real)}
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()  # a live run's new points show in TensorBoard at once
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flushes and closes the TensorBoard file and finishes the W&B run."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(workdir: str, baseline: float | None = None) -> str:
    """Writes plots/loss.png: train and validation loss (with the unigram baseline) and
    expert-load imbalance (MaxVio). Returns the file path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    train = [(r["step"], r["ce"]) for r in records if "ce" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    vio = [(r["step"], r["max_vio"]) for r in records if "max_vio" in r]
    fig, axes = plt.subplots(1, 2 if vio else 1, figsize=(11 if vio else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train cross-entropy")
    if val:
        ax.plot(*zip(*val), "o-", label="validation cross-entropy")
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, color="gray", linestyle="--", label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title("loss")
    ax.legend()
    if vio:
        ax = axes[0][1]
        ax.plot(*zip(*vio), color="tab:red")
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio")
        ax.set_title("expert load imbalance (max/mean - 1)")
    fig.tight_layout()
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    path = os.path.join(workdir, "plots", "loss.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_grpo(workdir: str) -> str:
    """Writes plots/grpo.png: reward (per prompt source too), accuracy (rollouts and
    held-out greedy), completion length and, with reward models, their score and the
    reward-hacking guard against the step. Returns the file path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    series = lambda key: [(r["step"], r[key]) for r in records if key in r]
    keys = sorted({k for r in records for k in r})
    sources = [k[:-len("/reward_mean")] for k in keys if k.endswith("/reward_mean")]
    panels = [("reward", [("reward_mean", "reward (mean over rollouts)")] +
               [(f"{src}/reward_mean", f"{src}") for src in sources]),
              ("accuracy", [("accuracy", "rollout accuracy (sampled)"), ("format_rate", "rollout format rate"),
                            ("test_accuracy", "held-out accuracy (greedy)")]),
              ("completion length (tokens)", [("completion_len", "mean"), ("completion_len_max", "max")] +
               [(f"{src}/completion_len", f"{src} mean") for src in sources])]
    guard = [k for k in keys if k.endswith("/rm_high_rule_fail") or k.endswith("/hack_rule_rate")]
    if "rm_score" in keys or guard:
        panels.append(("reward model and hacking guard", [("rm_score", "reward-model score")] +
                       [(k, k.replace("rm_high_rule_fail", "RM high, rule fails")) for k in guard]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, keys) in zip(axes, panels):
        for key, label in keys:
            points = series(key)
            if points:
                ax.plot(*zip(*points), "o-" if key.startswith("test_") else "-", label=label)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    path = os.path.join(workdir, "plots", "grpo.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
