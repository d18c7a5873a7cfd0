"""The run skeleton every stage shares: set-up, config check, init or resume, the step
loop, metrics, evaluation, checkpoints, plots, the progress bar and the end-of-run sample.

A stage (pretraining, SFT, GRPO, ...) is its batch source and its step function: a
`Stage` subclass loads its data in `__init__`, compiles its step in `compile`, and runs
one optimizer step (or one rollout + update) in `step`. Each stage module under
train/stages/ declares itself with a `StageSpec`. Everything else lives here once.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from dsjax import impl
from dsjax.checkpoint import Checkpointer, restore_variables
from dsjax.config import ConfigError
from dsjax.decoding import generate
from dsjax.losses import make_eval_step
from dsjax.model import Transformer, unbox
from dsjax.tokenizer import load_tokenizer
from sharding.mesh import make_mesh
from sharding.rules import activation_rules
from train.optim import lr_schedule, make_optimizer
from train.report import MetricsLog, plot_curves
from train.steps import TrainState, flops_per_token, make_train_step, schedules, state_shardings
from train.workdir import CHECKPOINTS, check_workdir, describe_changes, schedule_changes, write_config

_PEAK_TFLOPS = (("v6", 918.0), ("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0),
                ("h200", 989.0), ("h100", 989.0), ("a100", 312.0))


@functools.lru_cache(maxsize=None)
def matmul_tflops(n: int = 2048, reps: int = 3) -> float:
    """float32 TFLOP/s of one jitted n x n matmul on the default device, the best of
    `reps` after a warm-up (measured once per process). On a CPU that device runs on
    every core, so this is the whole process's CPU peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def peak_tflops(device) -> float:
    """Peak of one device (TFLOP/s): a GPU's or TPU's dense bf16 figure from its kind (0.1
    if unknown); a CPU device's share of the process's measured float32 matmul throughput
    (`matmul_tflops`), since the process's CPU devices share its cores."""
    if device.platform == "cpu":
        return matmul_tflops() / jax.local_device_count(backend="cpu")
    kind = f"{device.platform} {getattr(device, 'device_kind', '')}".lower()
    for key, value in _PEAK_TFLOPS:
        if key in kind:
            return value
    return 0.1


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """A stage's declaration: each module under train/stages/ ends with `STAGE = StageSpec(...)`.

    Attributes:
      name: the stage as the command line names it (`python -m train NAME`).
      section: the run config section it adds (`cfg.<section>`, `--set <section>.key=...`);
        None for a stage with no settings of its own.
      config: that section's frozen dataclass (holding every default; a `validate()`
        method, when it has one, raises ConfigError for impossible values); None with no
        section.
      stage: the Stage subclass that runs it.
      default_config: the run config it reads unless --config names another
        (`configs/<default_config>.yaml`).
    """

    name: str
    section: str | None
    config: type | None
    stage: type
    default_config: str


@dataclasses.dataclass
class Run:
    """What every stage of one run shares (built by `run_stage`)."""

    cfg: Any
    workdir: str
    lead: bool
    mesh: Any
    rules: Any
    model: Transformer
    tokenizer: Any
    tx: Any
    lr_schedule: Any
    state_sh: TrainState
    batch_sh: NamedSharding
    local_batch: int
    process_index: int
    process_count: int

    @property
    def batch_devices(self) -> int:
        """Devices a batch's rows are split over: data x fsdp x expert."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"] * self.mesh.shape["expert"]

    def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows of a batch -> global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sh, v) for k, v in batch.items()}

    def log(self, message: str) -> None:
        if self.lead:
            tqdm.write(message)


class Stage(abc.ABC):
    """One training stage. Subclasses set `name` and implement `step`.

    Attributes:
      tokens_per_step: tokens one step trains on (for tokens/s and MFU).
      eval_at_start: evaluate before the first step too (logged as step 0).
      head_params: top-level parameters the stage's model adds to the language model's
        (fresh when the run starts from init.workdir / init.hf).
      prints_sample: the run ends by printing text the model generates
        (train.sample_tokens of it, after `sample_prompt()`).
    """

    name = "stage"
    eval_at_start = False
    head_params: tuple[str, ...] = ()
    prints_sample = True

    @classmethod
    def build_model(cls, model_cfg):
        """The module this stage trains (a Transformer; a reward model adds a head)."""
        return Transformer(model_cfg)

    @classmethod
    def needs_reference(cls, cfg) -> bool:
        """Whether the state carries frozen reference parameters (GRPO with beta > 0)."""
        return False

    @classmethod
    def schedules(cls, cfg) -> tuple[str, ...]:
        """The schedules its step follows under `cfg`, of 'lr', 'mtp' (the MTP loss weight)
        and 'bias' (the router-bias speed): a resumed run may not change them unasked."""
        return ("lr", "mtp", "bias")

    @classmethod
    def updates_per_step(cls, cfg) -> int:
        """Optimizer updates one step makes (GRPO: mu x minibatches); the learning-rate and
        bias schedules count steps, not updates."""
        return 1

    def __init__(self, run: Run):
        self.run = run
        self.tokens_per_step = run.cfg.train.batch_size * run.cfg.train.seq_len

    def data_state(self) -> dict:
        """What a checkpoint must hold to resume the batch source exactly."""
        return {}

    def set_data_state(self, state: dict) -> None:
        pass

    def compile(self) -> None:
        """Builds the jitted functions (the state shardings are in self.run.state_sh)."""

    @abc.abstractmethod
    def step(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        """One step: the new state and its metrics (device arrays or floats)."""

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Held-out figures logged every train.eval_every steps and at the end ({}: none)."""
        return {}

    def progress(self, record: dict) -> dict[str, str]:
        """What the progress bar shows after a logged step."""
        return {"loss": f"{record['loss']:.3f}"} if "loss" in record else {}

    def plot(self) -> str | None:
        return plot_curves(self.run.workdir)

    def summary(self, last_eval: dict[str, float]) -> str:
        return "; ".join(f"{k} {v:.4f}" for k, v in last_eval.items())

    def sample_prompt(self) -> str:
        return self.run.cfg.train.sample_prompt


class SupervisedStage(Stage):
    """Next-token training on batches from `self.batches` (a grain iterator with
    get/set_state), validated on `self.val` (a list of batches)."""

    batches: Any = None
    val: list = []

    def __init__(self, run: Run):
        super().__init__(run)
        shards = run.batch_devices
        if run.cfg.train.batch_size % shards:
            raise ConfigError(f"train.batch_size={run.cfg.train.batch_size} does not divide over the {shards} "
                              f"devices of the mesh's batch axes (data x fsdp x expert)")

    def data_state(self) -> dict:
        return self.batches.get_state()

    def set_data_state(self, state: dict) -> None:
        self.batches.set_state(state)

    def compile(self) -> None:
        run = self.run
        self.train_step = jax.jit(make_train_step(run.model, run.tx, run.cfg.train, run.lr_schedule, run.rules),
                                  in_shardings=(run.state_sh, run.batch_sh), out_shardings=(run.state_sh, None),
                                  donate_argnums=(0,))
        self.eval_step = jax.jit(make_eval_step(run.model, run.rules),
                                 in_shardings=(run.state_sh.params, run.state_sh.moe_bias, run.batch_sh))

    def step(self, state, step):
        return self.train_step(state, self.run.to_global(next(self.batches)))

    def evaluate(self, state) -> dict[str, float]:
        if not self.val:
            return {}
        sums = jax.device_get([self.eval_step(state.params, state.moe_bias, self.run.to_global(b))
                               for b in self.val])
        return {"val_loss": float(sum(s for s, _ in sums) / max(sum(c for _, c in sums), 1.0))}


def _initial_variables(run: Run, abstract_state: TrainState, heads: tuple[str, ...] = ()):
    """Parameters and router bias from init.workdir or init.hf, placed as the state's;
    the stage's `heads` parameters are left out (the caller initializes them)."""
    init = run.cfg.init
    target = {"params": {k: v for k, v in abstract_state.params.items() if k not in heads},
              "moe_bias": abstract_state.moe_bias}
    if init.workdir:
        try:
            variables, step = restore_variables(os.path.join(init.workdir, CHECKPOINTS), target)
        except FileNotFoundError as e:
            raise ConfigError(f"init.workdir: {e}") from None
        run.log(f"init: parameters from {init.workdir} (step {step})")
        return variables
    from dsjax.hf import from_pretrained

    shardings = jax.tree.map(lambda a: a.sharding, target)
    try:
        _, variables = from_pretrained(init.hf, shardings=shardings, mtp="init")
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise ConfigError(f"init.hf: {e}") from None
    run.log(f"init: parameters from the Hugging Face directory {init.hf}")
    return {"params": variables["params"], "moe_bias": variables.get("moe_bias", {})}


def build_run(cfg, mesh, platform: str, stage_cls: type[Stage], *, workdir: str = "", tokenizer=None,
              lead: bool = True, process_index: int = 0, process_count: int = 1):
    """The `Run` of `stage_cls` on `mesh` (what `run_stage` trains and `train.aot` compiles):
    the model built from `cfg.model` resolved for `platform` with float32 master weights,
    the optimizer, and the state and batch shardings. Returns (run, the model's boxed
    abstract variables). ValueError for parameters the mesh cannot split."""
    model_cfg = impl.resolve(cfg.model, platform).replace(param_dtype="float32")
    cfg = cfg.replace_section("model", model_cfg)
    tcfg = cfg.train
    model = stage_cls.build_model(cfg.model)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, tcfg.seq_len), jnp.int32))
    tx, lr_schedule = make_optimizer(tcfg, boxed["params"], stage_cls.updates_per_step(cfg))
    state_sh = state_shardings(boxed, tx, mesh, cfg.mesh.rules, reference=stage_cls.needs_reference(cfg))
    run = Run(cfg=cfg, workdir=workdir, lead=lead, mesh=mesh, rules=activation_rules(cfg.mesh.rules), model=model,
              tokenizer=tokenizer, tx=tx, lr_schedule=lr_schedule, state_sh=state_sh,
              batch_sh=NamedSharding(mesh, P(("data", "fsdp", "expert"))),
              local_batch=tcfg.batch_size // process_count, process_index=process_index,
              process_count=process_count)
    return run, boxed


def run_stage(cfg, workdir: str, stage_cls: type[Stage]) -> int:
    """Runs `stage_cls` under `cfg` in `workdir`, resuming it if it holds a checkpoint
    (jax.distributed, when the run has several processes, is started by the caller).

    The model is built from `cfg.model` with its implementation choices resolved for the
    platform of the mesh's devices (dsjax.impl.resolve); config.yaml holds them resolved."""
    tcfg = cfg.train
    workdir = os.path.abspath(workdir)
    lead = jax.process_index() == 0
    check_workdir(workdir, cfg.model, stage_cls.name)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens")
    try:
        mesh = make_mesh(cfg.mesh)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    n_proc, proc = jax.process_count(), jax.process_index()
    if tcfg.batch_size % n_proc:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} does not divide over {n_proc} processes")
    if cfg.model.param_dtype != "float32" and lead:
        print(f"training keeps float32 master weights (model.param_dtype={cfg.model.param_dtype} "
              "is used for checkpoints exported to Hugging Face)")
    try:
        run, _ = build_run(cfg, mesh, impl.platform_of(mesh), stage_cls, workdir=workdir, tokenizer=tokenizer,
                           lead=lead, process_index=proc, process_count=n_proc)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg, model, tx, state_sh = run.cfg, run.model, run.tx, run.state_sh
    reference = stage_cls.needs_reference(cfg)

    def init_state(rng):
        return TrainState.start(unbox(model.init(rng, jnp.zeros((1, tcfg.seq_len), jnp.int32))), tx, reference)

    def state_from(variables):
        return TrainState.start(variables, tx, reference)

    with jax.set_mesh(mesh):
        ckpt_dir = os.path.join(workdir, CHECKPOINTS)
        # Created only once the initial state exists, so a bad init source writes nothing.
        ckpt = Checkpointer(ckpt_dir, keep=tcfg.keep_checkpoints) if os.path.isdir(ckpt_dir) else None
        start = ckpt.latest_step() if ckpt else None
        if start is not None and start >= tcfg.steps:
            run.log(f"already trained to step {start} (train.steps={tcfg.steps}); nothing to do")
            ckpt.close()
            return 0
        if start is not None:
            try:
                _check_schedule(run, stage_cls, start)
            except ConfigError:
                ckpt.close()
                raise
        stage = stage_cls(run)
        abstract_state = jax.eval_shape(init_state, jax.random.key(tcfg.seed))
        abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract_state, state_sh)
        if start is not None:
            state, extra = ckpt.restore(start, abstract_state)
            stage.set_data_state(extra["data"])
            run.log(f"resumed from {ckpt.directory} at step {start}")
        else:
            if cfg.init.workdir or cfg.init.hf:
                variables = _initial_variables(run, abstract_state, stage_cls.head_params)
                if stage_cls.head_params:
                    fresh = jax.jit(init_state, out_shardings=state_sh)(jax.random.key(tcfg.seed)).params
                    variables["params"] = {**variables["params"],
                                           **{k: fresh[k] for k in stage_cls.head_params}}
                state = jax.jit(state_from, out_shardings=state_sh)(variables)
            else:
                state = jax.jit(init_state, out_shardings=state_sh)(jax.random.key(tcfg.seed))
            start = 0
        if ckpt is None:
            ckpt = Checkpointer(ckpt_dir, keep=tcfg.keep_checkpoints)
        if lead:
            write_config(workdir, cfg, stage.name)
        stage.compile()
        metrics_log = MetricsLog(workdir, start if start else None, cfg.logging, cfg.as_dict()) if lead else None
        flag: dict = {"signal": None}
        run.log(f"compiling the {stage.name} step for {mesh.size} {impl.platform_of(mesh)} device(s): the first "
                f"step includes XLA's compilation, so its time and the first time estimate run long")
        try:
            state, stopped = _with_stop_signals(flag, lambda: _loop(run, stage, state, start, ckpt, metrics_log,
                                                                    flag))
        finally:
            ckpt.close()  # waits for the async save, also when the run stops on an error
            if metrics_log is not None:
                metrics_log.close()
        if stopped:
            return 0
        if lead:
            plot = stage.plot()
            print(f"done: {tcfg.steps} steps; plot {plot}" + (f"; {stage.summary(stage.last_eval)}"
                                                                if stage.last_eval else ""))
        if tcfg.sample_tokens and stage.prints_sample:
            _print_sample(run, stage, state)
    return 0


def _check_schedule(run: Run, stage_cls: type[Stage], start: int) -> None:
    """Resuming at `start` with other values of the keys the schedules follow (train/workdir.py
    SCHEDULE_KEYS): where that changes the learning rate, the MTP weight or the router-bias
    speed of a step from `start` on (those of `stage_cls.schedules` the model has),
    ConfigError unless train.allow_schedule_change; where it is allowed, or changes none of
    them, one line says what changed."""
    tcfg = run.cfg.train
    changes = schedule_changes(run.workdir, tcfg)
    if not changes:
        return
    followed = set(stage_cls.schedules(run.cfg))
    if not run.cfg.model.num_nextn_predict_layers:
        followed.discard("mtp")
    if not run.cfg.model.n_routed_experts:
        followed.discard("bias")
    try:
        old = dataclasses.replace(tcfg, **{k: v for k, (v, _) in changes.items()})
        moved = _schedule_moves(old, tcfg, start, followed)
    except (TypeError, ValueError) as e:  # a config.yaml value of another type
        raise ConfigError(f"{os.path.join(run.workdir, 'config.yaml')}: train: {e}") from None
    if moved and not tcfg.allow_schedule_change:
        raise ConfigError(f"--workdir {run.workdir} holds a run at step {start}: {describe_changes(changes)} "
                          f"changes its schedule ({moved}); add --set train.allow_schedule_change=true to go on "
                          f"with the new schedule, or use another workdir")
    run.log(f"resuming at step {start} with {describe_changes(changes)}: "
            + (f"the schedule changes ({moved})" if moved else f"the schedule from step {start} on is unchanged"))


def _schedule_moves(old, new, start: int, followed=("lr", "mtp", "bias")) -> str:
    """The first quantity of `followed` ('lr', 'mtp', 'bias') whose schedule differs between
    TrainConfigs `old` and `new` at a step from `start` on ('learning rate at step 500:
    0.0003 -> 0.00046'), or ''."""
    steps = jnp.arange(start, max(old.steps, new.steps, start + 1))
    (old_mtp, old_gamma), (new_mtp, new_gamma) = schedules(old), schedules(new)
    for key, name, a, b in (("lr", "learning rate", lr_schedule(old), lr_schedule(new)),
                            ("mtp", "MTP loss weight", old_mtp, new_mtp),
                            ("bias", "router-bias speed", old_gamma, new_gamma)):
        if key not in followed:
            continue
        x, y = (np.broadcast_to(np.asarray(f(steps), np.float64), steps.shape) for f in (a, b))
        differ = np.flatnonzero(~np.isclose(x, y, rtol=1e-6, atol=0.0))
        if differ.size:
            i = int(differ[0])
            return f"{name} at step {start + i}: {x[i]:.3g} -> {y[i]:.3g}"
    return ""


class RunStopped(Exception):
    """A run that cannot go on (non-finite steps in a row): one line for the user, exit 1."""


def _stop_requested(run: Run, flag: dict, synced: bool) -> bool:
    """Whether a signal asked this run to stop. Several processes agree on it (one small
    all-gather) only on steps where the host syncs anyway (`synced`)."""
    mine = flag["signal"] is not None
    if run.process_count > 1:
        if not synced:
            return False
        return bool(np.asarray(multihost_utils.process_allgather(np.int32(mine))).any())
    return mine


def _loop(run: Run, stage: Stage, state: TrainState, start: int, ckpt: Checkpointer, metrics_log,
          flag: dict | None = None) -> tuple[TrainState, bool]:
    """Runs the steps; returns (state, whether a signal stopped it early after a save)."""
    tcfg = run.cfg.train
    flag = flag if flag is not None else {"signal": None}
    bad = jnp.zeros((), jnp.int32)
    fpt = flops_per_token(run.cfg.model, tcfg.seq_len)
    peak = (tcfg.peak_tflops or peak_tflops(jax.devices()[0])) * 1e12 * jax.device_count()
    bar = tqdm(total=tcfg.steps, initial=start, disable=not run.lead, dynamic_ncols=True, mininterval=1.0,
               desc=stage.name)
    last_time, last_step = None, start
    stage.last_eval = {}
    if start == 0 and stage.eval_at_start and tcfg.eval_every:
        stage.last_eval = stage.evaluate(state)
        if stage.last_eval and run.lead:
            bar.write("step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in stage.last_eval.items()))
            if run.lead:
                metrics_log.write({"step": 0, **stage.last_eval})
    for step in range(start, tcfg.steps):
        state, metrics = stage.step(state, step)
        done = step + 1
        # Counted on the device (no host round trip per step), read when the host syncs anyway.
        bad = jnp.where(jnp.asarray(metrics["skipped"]) > 0, bad + 1, 0)
        if last_time is None:  # the first step includes compilation: time from its end
            jax.block_until_ready(metrics)
            last_time, last_step = time.time(), done
        record = None
        if done % tcfg.log_every == 0 or done == tcfg.steps:
            metrics = jax.device_get(metrics)
            now = time.time()
            tps = stage.tokens_per_step * (done - last_step) / max(now - last_time, 1e-9) if done > last_step else 0.0
            last_time, last_step = now, done
            record = {"step": done, **{k: float(v) for k, v in metrics.items()}, "tokens_per_s": tps,
                      "mfu": tps * fpt / peak}
            bar.set_postfix(**stage.progress(record), tok_s=f"{tps:,.0f}", refresh=False)
        if tcfg.eval_every and (done % tcfg.eval_every == 0 or done == tcfg.steps):
            stage.last_eval = stage.evaluate(state)
            if stage.last_eval:
                record = {**(record or {"step": done}), **stage.last_eval}
                if run.lead:
                    bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in stage.last_eval.items()))
        if record is not None and run.lead:
            metrics_log.write(record)
        saving = done % tcfg.checkpoint_every == 0 or done == tcfg.steps
        if record is not None or saving:
            n_bad = int(bad)
            if n_bad >= tcfg.max_bad_steps:
                bar.close()
                raise RunStopped(f"the loss or gradients were not finite for {n_bad} steps in a row (steps "
                                 f"{done - n_bad + 1} to {done}; each was skipped); stopping. The latest "
                                 f"checkpoint (step {ckpt.latest_step()}) holds only finite values")
        stopping = _stop_requested(run, flag, synced=record is not None or saving)
        if saving or stopping:
            ckpt.save(done, state, {"data": stage.data_state(), "step": done})
        bar.update(1)
        if stopping:
            bar.close()
            run.log(f"{flag['signal'] or 'a signal on another process'}: saved step {done}; "
                    f"run the same command again to resume")
            return state, True
    bar.close()
    return state, False


def _with_stop_signals(flag: dict, body):
    """Runs body() with SIGTERM and SIGINT recorded in flag['signal'] (the loop saves and
    stops after the current step) instead of killing the process."""
    import signal

    def record(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, record)
    except ValueError:  # not the main thread: signals stay as they were
        pass
    try:
        return body()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _print_sample(run: Run, stage: Stage, state: TrainState) -> None:
    """Generates from the trained model where its sharded parameters are, under the run's
    mesh and rules (every process joins; process 0 prints)."""
    tcfg, tokenizer = run.cfg.train, run.tokenizer
    text = stage.sample_prompt()
    prompt = tokenizer.encode(text)
    if len(prompt) == 0:
        return
    variables = {"params": state.params}
    if state.moe_bias:
        variables["moe_bias"] = state.moe_bias
    stop = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
    out = generate(run.model, variables, prompt[None], [len(prompt)], tcfg.sample_tokens, temperature=0.8,
                   rng=jax.random.key(tcfg.seed), top_k=40, stop_tokens=stop, mesh=run.mesh, rules=run.rules)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)  # replicated: every process reads its copy
    if run.lead:
        print("sample:\n" + text + tokenizer.decode(tokens[0, :int(lengths[0])]))
