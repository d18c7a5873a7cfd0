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
student) on the response tokens (Hinton et al.'s soft targets at `kl_temperature`). The
teacher runs inside the jitted step: its frozen parameters are an argument of the step,
sharded by the run's rules as the student's are, and the KL is summed over the
vocabulary a chunk at a time (dsjax.losses.distillation_kl), so no [B, T, V] tensor
leaves the devices. It needs the two models to share a vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from dsjax import impl
from dsjax.checkpoint import load_trained, read_run_config, run_model_config
from dsjax.config import ConfigError, ModelConfig
from dsjax.losses import apply_model, distillation_kl, masked_mean
from dsjax.model import Transformer
from sharding.rules import tree_shardings
from train.config import InitConfig
from train.loop import StageSpec
from train.stages.sft import SFTStage
from train.steps import supervised_loss, supervised_update


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
      kl_chunks: vocabulary chunks the KL is summed over (each chunk's float32
        log-probabilities are the step's largest KL temporaries).
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
    kl_chunks: int = 4

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
        if self.kl_chunks < 1:
            raise ConfigError(f"distill.kl_chunks must be at least 1, got {self.kl_chunks}")

    def teacher_source(self) -> str:
        return self.teacher or self.teacher_hf

    def data_from(self) -> tuple[InitConfig, tuple[str, str]] | None:
        """The teacher, whose tokenizer the student reads its text with unless told
        otherwise (train.config.build_config), and the keys that name it."""
        if not self.teacher_source():
            return None
        return InitConfig(workdir=self.teacher, hf=self.teacher_hf), ("distill.teacher", "distill.teacher_hf")


def teacher_model(d: DistillConfig, platform: str) -> Transformer:
    """The teacher's Transformer (full-sequence attention, implementation choices
    resolved for `platform`), from its run directory or Hugging Face config.json."""
    try:
        if d.teacher:
            cfg = run_model_config(d.teacher)
        else:
            with open(os.path.join(d.teacher_hf, "config.json")) as f:
                cfg = ModelConfig.from_hf(json.load(f), dtype="float32", param_dtype="float32",
                                          num_nextn_predict_layers=0)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"distill teacher: {e.args[0] if e.args else e}") from None
    return Transformer(impl.resolve(cfg.replace(attn_impl="naive"), platform))


def load_teacher(d: DistillConfig, model: Transformer, shardings: dict) -> dict:
    """The teacher's {'params', 'moe_bias'}, read straight onto `shardings` (a tree like them)."""
    import dsjax

    try:
        if d.teacher:
            _, variables, _ = load_trained(d.teacher, shardings=shardings)
        else:
            _, variables = dsjax.from_pretrained(d.teacher_hf, mtp="off", shardings=shardings)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise ConfigError(f"distill teacher: {e.args[0] if e.args else e}") from None
    return {"params": variables["params"], "moe_bias": variables.get("moe_bias", {})}


def make_distill_step(model: Transformer, teacher: Transformer, tx, tcfg, lr_schedule, rules=(),
                      kl_weight: float = 1.0, temperature: float = 1.0, chunks: int = 4):
    """Returns distill_step(state, teacher_variables, batch) -> (state, metrics): the
    supervised objective plus kl_weight x KL(teacher || student) over the scored tokens,
    the teacher's logits computed in the step from its frozen `teacher_variables`
    ({'params', 'moe_bias'}; no gradient). Metrics add `distill_kl`.

    `batch` as train.steps.supervised_loss takes it (inputs, targets, ... [B, T]).
    """
    base = supervised_loss(model, tcfg, rules)

    def loss_fn(params, moe_bias, teacher_variables, batch, step):
        loss, (out, parts) = base(params, moe_bias, batch, step)
        t_out = apply_model(teacher, teacher_variables["params"], teacher_variables["moe_bias"], batch["inputs"],
                            batch.get("positions"), batch.get("segment_ids"), mtp=False, rules=rules)
        kl = masked_mean(distillation_kl(jax.lax.stop_gradient(t_out.logits), out.logits, temperature, chunks),
                         batch.get("mask"))
        return loss + kl_weight * kl, (out, {**parts, "distill_kl": kl})

    def distill_step(state, teacher_variables, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (out, parts)), grads = grad_fn(state.params, state.moe_bias, teacher_variables, batch, state.step)
        return supervised_update(state, tx, tcfg, lr_schedule, loss, out, grads, parts)

    return distill_step


def sample_teacher(run, d: DistillConfig, path: str) -> dict:
    """Rejection-samples the teacher into SFT JSONL at `path`; the per-task statistics."""
    from eval import reasoning as rs
    from eval import tasks as tasks_lib
    from eval.__main__ import sampling_defaults

    try:
        spec, template, max_new = sampling_defaults(read_run_config(d.teacher) if d.teacher else {}, d.task,
                                                    d.template, d.max_new_tokens)
    except FileNotFoundError:
        raise ConfigError(f"distill.teacher: {d.teacher} is not a training workdir (no config.yaml)") from None
    if not spec:
        raise ConfigError("distill.task is needed: the teacher names no grpo task")
    import dsjax

    try:
        if d.teacher:
            model, variables, _ = load_trained(d.teacher)
        else:
            model, variables = dsjax.from_pretrained(d.teacher_hf)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise ConfigError(f"distill teacher: {e.args[0] if e.args else e}") from None
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
            self.teacher = teacher_model(d, impl.platform_of(run.mesh))
            if self.teacher.cfg.vocab_size != run.model.cfg.vocab_size:
                raise ConfigError(f"distill.kl_weight needs one vocabulary: the teacher has "
                                  f"{self.teacher.cfg.vocab_size} tokens, the student {run.model.cfg.vocab_size}")
            boxed = jax.eval_shape(self.teacher.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
            try:
                sh = tree_shardings(boxed, run.mesh, run.cfg.mesh.rules)
            except ValueError as e:
                raise ConfigError(f"distill teacher: {e}") from None
            self.teacher_sh = {"params": sh["params"], "moe_bias": sh.get("moe_bias", {})}
            self.teacher_variables = load_teacher(d, self.teacher, self.teacher_sh)
        super().__init__(run)

    def sources(self) -> list[str]:
        if not os.path.isfile(self.data_path):
            raise ConfigError(f"distill.data: {self.data_path} does not exist")
        return [self.data_path]

    def compile(self) -> None:
        super().compile()
        if self.teacher is None:
            return
        run, d = self.run, self.run.cfg.distill
        step = make_distill_step(run.model, self.teacher, run.tx, run.cfg.train, run.lr_schedule, run.rules,
                                 d.kl_weight, d.kl_temperature, d.kl_chunks)
        self.train_step = jax.jit(step, in_shardings=(run.state_sh, self.teacher_sh, run.batch_sh),
                                  out_shardings=(run.state_sh, None), donate_argnums=(0,))

    def step(self, state, step):
        if self.teacher is None:
            return super().step(state, step)
        return self.train_step(state, self.teacher_variables, self.run.to_global(next(self.batches)))


STAGE = StageSpec(name="distill", section="distill", config=DistillConfig, stage=DistillStage,
                  default_config="distill")
