"""A run's programs compiled ahead of time for a TPU slice that is not here
(`python -m train --dry-run --topology NAME`).

The programs are the ones the run executes, built by the stage's own `compile()` (the
train step with its optimizer, MTP, non-finite guard and donation from train/steps.py;
GRPO's update step and its rollout `generate` program) with the run's shardings, on a mesh
of the slice's chips (`sharding.topology`), the model's implementation choices resolved for
'tpu'. Each is lowered from abstract arguments (`jax.ShapeDtypeStruct`s with their
shardings) and compiled by libtpu's XLA:TPU: nothing is allocated and no TPU is needed.

What one chip holds is read from XLA's `memory_analysis()` (arguments, outputs,
temporaries, the arguments donated to outputs, generated code); the HLO gives the
collectives by kind and the custom-call kernels by target name. A program's peak is
argument + output + temp - alias; GRPO's rollout runs while the training state stays in
HBM, so its peak adds the state it does not take as an argument.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from dsjax import impl
from dsjax.model import unbox
from sharding.rules import tree_shardings
from sharding.topology import device_hbm_gib, topology_devices, topology_mesh
from train.plan import GiB, MemoryPlan, memory_plan
from train.steps import TrainState

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")


@dataclasses.dataclass
class Program:
    """One compiled program's figures per chip (bytes) and what its HLO uses.

    Attributes:
      name: what the run calls it ('train_step', 'grpo_update', 'rollout', ...).
      seconds: lowering + compile wall time.
      argument / output / temp / alias / generated_code: `memory_analysis()` bytes.
      resident: bytes the run holds in HBM beside the program's arguments while it runs
        (GRPO's rollout: the optimizer state and reference parameters), added to its peak.
      collectives: {kind: count} of collective ops in the optimized HLO (each op once,
        loop bodies not multiplied; async pairs counted at their start).
      custom_calls: {target: count} of custom calls; Pallas kernels (`tpu_custom_call`)
        by their kernel's name.
      refused: XLA:TPU's message where it refused the program (its buffers exceed a
        chip's HBM; then `temp` is the message's figure and output / alias are unknown, 0).
    """

    name: str
    seconds: float
    argument: int
    output: int
    temp: int
    alias: int
    generated_code: int
    resident: int
    collectives: dict[str, int]
    custom_calls: dict[str, int]
    refused: str = ""

    @property
    def peak(self) -> int:
        return self.argument + self.output + self.temp - self.alias + self.resident

    def figures(self) -> dict[str, Any]:
        gib = lambda b: round(b / GiB, 3)  # noqa: E731
        return {"compile_s": round(self.seconds, 1), "argument_gib": gib(self.argument), "output_gib": gib(self.output),
                "temp_gib": gib(self.temp), "alias_gib": gib(self.alias), "resident_gib": gib(self.resident),
                "generated_code_mib": round(self.generated_code / 2**20, 2), "peak_gib": gib(self.peak),
                "collectives": self.collectives, "custom_calls": self.custom_calls,
                **({"refused": self.refused} if self.refused else {})}


def hlo_collectives(hlo: str) -> dict[str, int]:
    """{kind: count} of the collective ops in HLO text (an async `-start`/`-done` pair once)."""
    ops = re.findall(r"= [^=]*? (" + "|".join(COLLECTIVES) + r")(-start)?\(", hlo)
    return dict(sorted(collections.Counter(kind for kind, _ in ops).items()))


def hlo_custom_calls(hlo: str) -> dict[str, int]:
    """{target: count} of the custom calls in HLO text. A Pallas/Mosaic TPU kernel's target
    is `tpu_custom_call`; it is counted as `tpu_custom_call:<kernel>`, the kernel named by
    its instruction (e.g. XLA:TPU's grouped GEMM for `jax.lax.ragged_dot`,
    `ragged-dot-none`; splash attention's `splash_mha_*`)."""
    out = collections.Counter()
    for line in hlo.splitlines():
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if not target:
            continue
        name = target.group(1)
        if name == "tpu_custom_call":
            instr = re.match(r"\s*(?:ROOT )?%?([\w\-]+?)(?:\.\d+)? = ", line)
            if instr:
                name = f"{name}:{instr.group(1)}"
        out[name] += 1
    return dict(sorted(out.items()))


def _analyse(name: str, lower, resident: int = 0, arguments=()) -> Program:
    """Compiles `lower()` and reads its figures. XLA:TPU refuses a program whose buffers
    exceed a chip's HBM (RESOURCE_EXHAUSTED); the Program then carries the refusal, its
    temp as the message gives it and its arguments' bytes from `arguments`."""
    t0 = time.perf_counter()
    try:
        compiled = lower().compile()
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        message = next(line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line).strip()
        temp = re.search(r"temporaries \(([\d.]+)G\)", message)
        return Program(name, time.perf_counter() - t0, _chip_bytes(arguments), 0,
                       int(float(temp.group(1)) * GiB) if temp else 0, 0, 0, resident, {}, {}, refused=message)
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    hlo = compiled.as_text()
    return Program(name, seconds, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                   int(m.temp_size_in_bytes), int(m.alias_size_in_bytes), int(m.generated_code_size_in_bytes),
                   resident, hlo_collectives(hlo), hlo_custom_calls(hlo))


def _abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _chip_bytes(abstract_tree) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        n = 1
        for d in shape:
            n *= d
        total += n * jnp.dtype(leaf.dtype).itemsize
    return total


def supervised_batch(stage: str, batch: int, seq_len: int, sharding) -> dict:
    """The abstract batch a supervised stage's step takes: `inputs`/`targets` [B, T]
    (pretrain), plus packed-window `positions`, `segment_ids` and `mask` (sft, distill), or
    the reward model's pairs `tokens` [B, 2, T], `last` [B, 2] (rm)."""
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)  # noqa: E731
    if stage == "rm":
        return {"tokens": i32(batch, 2, seq_len), "last": i32(batch, 2)}
    out = {"inputs": i32(batch, seq_len), "targets": i32(batch, seq_len)}
    if stage in ("sft", "distill"):
        out.update(positions=i32(batch, seq_len), segment_ids=i32(batch, seq_len),
                   mask=jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_, sharding=sharding))
    return out


@dataclasses.dataclass
class Compiled:
    """A run's programs compiled for a slice, beside the plan.

    Attributes:
      topology / device_kind / chips / hbm_gib: the slice.
      stage: the stage's name.
      batch: (rows, tokens per row) of a training step's batch (GRPO: of an update).
      cfg: the run config with the model resolved for 'tpu'.
      plan: train/plan.py's MemoryPlan of the same layout (GRPO: of its update step).
      programs: the compiled programs.
    """

    topology: str
    device_kind: str
    chips: int
    hbm_gib: float
    stage: str
    batch: tuple[int, int]
    cfg: Any
    plan: MemoryPlan
    programs: list[Program]

    @property
    def compiled_bytes(self) -> int:
        """What one chip holds at the run's peak: the largest program's peak."""
        return max(p.peak for p in self.programs)

    @property
    def fits(self) -> bool:
        return not any(p.refused for p in self.programs) and self.compiled_bytes <= self.hbm_gib * GiB

    def summary(self) -> dict[str, Any]:
        """The dry run's JSON line."""
        from dsjax.config import param_counts

        compiled = self.compiled_bytes / GiB
        plan = self.plan.total / GiB
        # A refused program's figure is XLA's requirement as it gave up, not a compiled
        # peak: no ratio is drawn against it.
        refused = next((p.refused for p in self.programs if p.refused), "")
        return {"topology": self.topology, "device_kind": self.device_kind, "chips": self.chips,
                "mesh": self.plan.mesh, "stage": self.stage,
                "params_b": round(param_counts(self.cfg.model)["total"] / 1e9, 3),
                "batch_size": self.batch[0], "seq_len": self.batch[1],
                "dtype": self.cfg.model.dtype, "remat_policy": self.cfg.model.remat_policy,
                "moe_impl": self.cfg.model.moe_impl, "attn_kernel": self.cfg.model.attn_kernel,
                "hbm_gib": self.hbm_gib, "plan_gib": round(plan, 3), "compiled_gib": round(compiled, 3),
                "plan_vs_compiled": round(plan / compiled, 3) if compiled and not refused else None,
                "fits": self.fits, **({"refused": refused} if refused else {}),
                "compile_s": round(sum(p.seconds for p in self.programs), 1),
                "programs": {p.name: p.figures() for p in self.programs}}


def compile_for_topology(cfg, stage_spec, topology: str, hbm: float | None = None) -> Compiled:
    """Compiles the programs of `stage_spec`'s run under the run config `cfg` for the TPU
    slice `topology`, with libtpu.

    Args:
      cfg: the run config (train.config.build_config).
      stage_spec: the stage's StageSpec (train.stages.all_stages()[name]).
      topology: libtpu's name of the slice, e.g. 'v5p:2x2x1'.
      hbm: HBM per chip in GiB (default: from the chips' device kind).
    Returns:
      Compiled. Raises sharding.topology.TopologyUnavailable without libtpu, ValueError for
      a topology, layout or batch that cannot be (its message names it).
    """
    from train.loop import build_run

    devices = topology_devices(topology)
    kind = str(devices[0].device_kind)
    hbm = device_hbm_gib(topology) if hbm is None else hbm
    mesh = topology_mesh(cfg.mesh, topology)
    stage_cls = stage_spec.stage
    run, boxed = build_run(cfg, mesh, "tpu", stage_cls)
    cfg, tcfg, tx, state_sh = run.cfg, run.cfg.train, run.tx, run.state_sh
    reference = stage_cls.needs_reference(cfg)
    abstract_state = jax.eval_shape(lambda v: TrainState.start(v, tx, reference), unbox(boxed))
    abstract_state = _abstract(abstract_state, state_sh)
    # Plans and stages are built outside the mesh: what they compute runs on this host, and
    # the slice's compile-only chips can hold no array.
    if stage_spec.name == "grpo":
        stage = _grpo_stage(run, stage_cls)
        rows, seq_len = stage.rows // cfg.grpo.minibatches, stage.seq - 1
        plan = memory_plan(cfg, len(devices), hbm, "tpu", batch_size=rows, seq_len=seq_len, reference=reference,
                           mtp=False)
        with jax.set_mesh(mesh):
            programs = _grpo_programs(run, stage, abstract_state)
    else:
        rows, seq_len = tcfg.batch_size, tcfg.seq_len
        plan = memory_plan(cfg, len(devices), hbm, "tpu")  # ValueError for a batch the mesh cannot split
        with jax.set_mesh(mesh):
            programs = _supervised_programs(run, stage_spec.name, stage_cls, abstract_state)
    return Compiled(topology, kind, len(devices), hbm, stage_spec.name, (rows, seq_len), cfg, plan, programs)


def _supervised_programs(run, name: str, stage_cls, abstract_state) -> list[Program]:
    """The train step of a supervised stage (pretrain, sft, rm, distill), from the stage's
    own `compile()` on a stage object that loaded no data (its step needs none to compile)."""
    tcfg = run.cfg.train
    stage = stage_cls.__new__(stage_cls)
    stage.run = run
    args = [abstract_state]
    if name == "distill" and run.cfg.distill.kl_weight:
        from train.stages.distill import teacher_model

        teacher = teacher_model(run.cfg.distill, "tpu")
        boxed = jax.eval_shape(teacher.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
        sh = tree_shardings(boxed, run.mesh, run.cfg.mesh.rules)
        stage.teacher = teacher
        stage.teacher_sh = {"params": sh["params"], "moe_bias": sh.get("moe_bias", {})}
        variables = unbox(boxed)
        args.append(_abstract({"params": variables["params"], "moe_bias": variables.get("moe_bias", {})},
                              stage.teacher_sh))
    elif name == "distill":
        stage.teacher = None
    stage.compile()
    args.append(supervised_batch(name, tcfg.batch_size, tcfg.seq_len, run.batch_sh))
    return [_analyse("train_step", lambda: stage.train_step.lower(*args), arguments=args)]


def _grpo_stage(run, stage_cls):
    """The GRPO stage built as the run builds it (its tokenizer loaded, its prompt sources
    generated: they fix the prompt width)."""
    from dsjax.tokenizer import load_tokenizer

    run.tokenizer = load_tokenizer(run.cfg.data.tokenizer)
    return stage_cls(run)


def _grpo_programs(run, stage, abstract_state) -> list[Program]:
    """GRPO's update step (as `GRPOStage.compile` jits it) and its rollout: the
    `dsjax.generate` program its GroupSampler calls, all prompts of a round at once,
    padded to the prompt width of the run's prompt sources, split by rows over the batch
    axes (prompts, cache and completions: each host decodes its rows)."""
    from dsjax.decoding import _generate_plain, _generate_speculative, _placement

    stage.compile()
    g = run.cfg.grpo
    rows = stage.rows // g.minibatches
    T = stage.seq - 1
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=run.batch_sh)  # noqa: E731
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32, sharding=run.batch_sh)  # noqa: E731
    batch = {"inputs": i32(rows, T), "targets": i32(rows, T),
             "mask": jax.ShapeDtypeStruct((rows, T), jnp.bool_, sharding=run.batch_sh),
             "advantages": f32(rows), "rollout_logp": f32(rows, T)}
    if g.beta:
        batch["ref_logp"] = f32(rows, T)
    if stage.use_old:
        batch["old_logp"] = f32(rows, T)
    programs = [_analyse("grpo_update", lambda: stage.update.lower(abstract_state, batch),
                         arguments=(abstract_state, batch))]

    # The rollout: generate's program as `complete` calls it (prompts padded to the width).
    variables = {"params": abstract_state.params}
    if abstract_state.moe_bias:
        variables["moe_bias"] = abstract_state.moe_bias
    mesh, rules, spec = _placement(run.mesh, run.rules, stage.rows)
    rows_sh = NamedSharding(mesh, spec)
    prompts = jax.ShapeDtypeStruct((stage.rows, stage.width), jnp.int32, sharding=rows_sh)
    lengths = jax.ShapeDtypeStruct((stage.rows,), jnp.int32, sharding=rows_sh)
    replicated = NamedSharding(mesh, P())
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    temperature = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    model = stage.generator.clone(cfg=impl.resolve(stage.generator.cfg, "tpu"))
    fn = _generate_speculative if g.speculative else _generate_plain
    resident = _chip_bytes(abstract_state) - _chip_bytes(variables)  # optimizer state, reference, step
    stop = (stage.stop,)
    programs.append(_analyse("rollout", lambda: fn.lower(
        model, variables, prompts, lengths, rng, temperature, max_new_tokens=g.max_new_tokens,
        greedy=g.temperature == 0, top_k=int(g.top_k), top_p=float(g.top_p), stop_tokens=stop, rules=rules,
        gather=False),
        resident=resident, arguments=(variables, prompts, lengths)))
    return programs
