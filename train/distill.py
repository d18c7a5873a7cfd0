"""`python -m train distill` (DeepSeek-R1 §2.4): a student trained by SFT on a teacher's
rejection-sampled generations.

The student is any model the `model` section names (a preset or explicit keys, dense or
MoE, of any size). Its data is `distill.data` (SFT JSONL, e.g. written by `python -m eval
reject`) or, when that is empty, the teacher (`distill.teacher` workdir or
`distill.teacher_hf` directory) is sampled first: `distill.samples` completions of each of
`distill.problems` training-split problems of `distill.task`, of which the correct and
well-formed ones are kept (the shortest per problem with `distill.shortest`) and written
to `WORKDIR/distill_data.jsonl`, with the acceptance rate per task in
`WORKDIR/rejection.json`. Training is then `python -m train sft` on that file.

Beyond R1 (which used SFT only), `distill.kl_weight > 0` adds a token-level KL(teacher ||
student) on the response tokens, from the teacher's logits computed in the step; it
needs the two models to share a vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from dsjax.config import ConfigError
from dsjax.losses import model_variables
from train.sft import SFTStage


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Attributes:
      teacher / teacher_hf: the teacher, a `python -m train` workdir or a Hugging Face
        directory (one of them, unless `data` is given and kl_weight is 0).
      data: SFT JSONL of teacher generations; empty: sample the teacher first.
      task: NAME[:DIFFICULTY][,...] to sample (default: the teacher run's grpo task).
      template: prompt template (default: the teacher run's grpo template, else 'r1').
      problems / samples: training-split problems per task, completions per problem.
      temperature / top_p / max_new_tokens: sampling (max_new_tokens 0: the teacher
        run's grpo.max_new_tokens, else 256).
      shortest: keep only the shortest passing completion of each problem.
      kl_weight / kl_temperature: weight and softmax temperature of the token-level KL to
        the teacher's logits (0: SFT only, as R1).
    """

    teacher: str = ""
    teacher_hf: str = ""
    data: str = ""
    task: str = ""
    template: str = ""
    problems: int = 2000
    samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 0
    shortest: bool = True
    kl_weight: float = 0.0
    kl_temperature: float = 1.0

    def validate(self) -> None:
        if self.teacher and self.teacher_hf:
            raise ConfigError("distill.teacher and distill.teacher_hf are exclusive: name one teacher")
        for name in ("problems", "samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.{name} must be at least 1, got {getattr(self, name)}")
        if self.kl_weight < 0 or self.kl_temperature <= 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("distill: kl_weight >= 0, kl_temperature > 0, temperature >= 0 and top_p in (0, 1]")
        if self.max_new_tokens < 0:
            raise ConfigError(f"distill.max_new_tokens must be >= 0, got {self.max_new_tokens}")

    def teacher_source(self) -> str:
        return self.teacher or self.teacher_hf


def teacher_run(d: DistillConfig) -> dict:
    """The teacher workdir's resolved run config ({} for a Hugging Face teacher)."""
    import yaml

    if not d.teacher:
        return {}
    path = os.path.join(d.teacher, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"distill.teacher: {d.teacher} is not a training workdir (no config.yaml)")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def load_teacher(d: DistillConfig):
    """(Transformer with absorbed attention, variables) of the teacher."""
    import dsjax
    from dsjax.checkpoint import load_trained

    try:
        if d.teacher:
            model, variables, _ = load_trained(d.teacher)
        else:
            model, variables = dsjax.from_pretrained(d.teacher_hf)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise ConfigError(f"distill teacher: {e.args[0] if e.args else e}") from None
    return model, variables


def sample_teacher(run, d: DistillConfig, path: str) -> dict:
    """Rejection-samples the teacher into SFT JSONL at `path`; the per-task statistics."""
    from eval import reasoning as rs
    from eval import tasks as tasks_lib

    trun = teacher_run(d).get("grpo", {})
    spec = d.task or (f"{trun['task']}:{trun['difficulty']}" if trun else "")
    if not spec:
        raise ConfigError("distill.task is needed: the teacher names no grpo task")
    template = d.template or trun.get("template", "r1")
    max_new = d.max_new_tokens or int(trun.get("max_new_tokens", 256))
    model, variables = load_teacher(d)
    model = model.clone(cfg=model.cfg.replace(attn_impl="absorb"))
    kept, stats = [], {}
    try:
        specs = tasks_lib.parse_spec(spec, template)
    except ValueError as e:
        raise ConfigError(f"distill.task: {e}") from None
    for label, task in specs:
        try:
            problems = task.split("train", d.problems, seed=run.cfg.train.seed)
        except ValueError as e:
            raise ConfigError(f"distill.task: {e}") from None
        groups, timing = rs.sample_problems(model, variables, run.tokenizer, problems, samples=d.samples,
                                            max_new_tokens=max_new, temperature=d.temperature, top_p=d.top_p,
                                            seed=run.cfg.train.seed, progress=run.lead, mesh=run.mesh,
                                            rules=run.rules)
        passing = rs.accepted(groups, shortest=False, dedup=False)
        chosen = rs.accepted(groups, shortest=d.shortest, dedup=True)
        kept += chosen
        stats[label] = {
            "acceptance": len(passing) / (len(problems) * d.samples), "kept": len(chosen),
            "teacher_pass@1": rs.report(groups)["pass@1"], "seconds": timing["seconds"]}
        run.log(f"rejection sampling {label}: {len(passing)} of {len(problems) * d.samples} "
                f"samples pass ({len(passing) / (len(problems) * d.samples):.1%}); kept {len(chosen)}")
    if not kept:
        raise ConfigError("rejection sampling kept no sample: the teacher solves none of the problems")
    rs.write_sft(kept, path)
    return stats


class DistillStage(SFTStage):
    """SFT of the student on the teacher's generations, optionally with a KL to its logits."""

    name = "distill"

    def __init__(self, run):
        d = run.cfg.distill
        if not d.data and not d.teacher_source():
            raise ConfigError("distill needs a teacher (distill.teacher=WORKDIR or distill.teacher_hf=DIR) "
                              "or data (distill.data=FILE.jsonl)")
        if d.kl_weight and not d.teacher_source():
            raise ConfigError("distill.kl_weight > 0 needs the teacher (distill.teacher or distill.teacher_hf)")
        self.data_path = d.data
        if not self.data_path:
            self.data_path = os.path.join(run.workdir, "distill_data.jsonl")
            if not os.path.exists(self.data_path):
                if run.process_count > 1:
                    raise ConfigError("sample the teacher in one process first (python -m eval reject) and "
                                      "pass distill.data=FILE.jsonl to a multi-process run")
                os.makedirs(run.workdir, exist_ok=True)
                stats = sample_teacher(run, d, self.data_path)
                with open(os.path.join(run.workdir, "rejection.json"), "w") as f:
                    json.dump(stats, f, indent=1)
        self.teacher = None
        if d.kl_weight:
            tmodel, tvars = load_teacher(d)
            if tmodel.cfg.vocab_size != run.model.cfg.vocab_size:
                raise ConfigError(f"distill.kl_weight needs one vocabulary: the teacher has "
                                  f"{tmodel.cfg.vocab_size} tokens, the student {run.model.cfg.vocab_size}")
            self.teacher = (tmodel.clone(cfg=tmodel.cfg.replace(attn_impl="naive")), tvars)
        super().__init__(run)

    def sources(self) -> list[str]:
        if not os.path.isfile(self.data_path):
            raise ConfigError(f"distill.data: {self.data_path} does not exist")
        return [self.data_path]

    def step_options(self) -> dict:
        d = self.run.cfg.distill
        return {"kl_weight": d.kl_weight, "kl_temperature": d.kl_temperature} if self.teacher else {}

    def compile(self) -> None:
        super().compile()
        if self.teacher is None:
            return
        tmodel, tvars = self.teacher
        temperature = self.run.cfg.distill.kl_temperature

        def teacher_logprobs(variables, batch):
            out = tmodel.apply(model_variables(variables["params"], variables.get("moe_bias", {})),
                               batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
            return jax.nn.log_softmax(out.logits.astype(jnp.float32) / temperature)

        self.teacher_fn = jax.jit(teacher_logprobs)
        self.teacher_vars = jax.device_put(tvars)

    def step(self, state, step):
        batch = self.run.to_global(next(self.batches))
        if self.teacher is not None:
            batch["teacher_logprobs"] = self.teacher_fn(self.teacher_vars, batch)
        return self.train_step(state, batch)
