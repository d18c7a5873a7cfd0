"""What the benchmarks share: `python -m train`'s training step built for a benchmark
(`train_step`), its run config (`run_config`), random batches, interleaved timing and
the JSON line each benchmark prints."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax import impl
from dsjax.model import Transformer, unbox
from sharding.rules import activation_rules
from train.config import RunConfig, build_config
from train.optim import make_optimizer
from train.steps import TrainState, make_train_step, state_shardings


def run_config(preset: str, batch: int, seq_len: int, *sets: str) -> RunConfig:
    """`python -m train`'s pretraining run config for `preset` at batch x seq_len tokens,
    with further `--set` items (`"model.num_nextn_predict_layers=0"`, ...)."""
    return build_config("pretrain", [f"model.preset={preset}", f"train.batch_size={batch}",
                                     f"train.seq_len={seq_len}", *sets])


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The trainer's jitted step for one model and train config, and what starts it.

    `step(state, batch) -> (state, metrics)` is train/steps.py's `make_train_step` with
    train/optim.py's AdamW, jitted (the state donated unless built with donate=False);
    under a mesh with the trainer's state and batch shardings and activation rules.
    """

    model: Transformer          # its implementation choices resolved for the platform
    tx: optax.GradientTransformation
    step: Callable
    boxed: Any                  # the model's abstract variables, logical axes included
    mesh: Mesh | None
    state_sharding: Any         # a TrainState of NamedShardings, or None without a mesh
    batch_sharding: NamedSharding | None

    def init_variables(self, seed: int = 0) -> dict:
        """Fresh {'params', 'moe_bias'} of the model (unboxed)."""
        return unbox(jax.jit(self.model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))

    def start(self, variables: dict) -> TrainState:
        """Step 0 from `variables` (the optimizer state fresh); sharded under a mesh. The
        state holds the variables' parameters: a donating step consumes them."""
        if self.mesh is None:
            return TrainState.start(variables, self.tx)
        return jax.jit(lambda v: TrainState.start(v, self.tx), out_shardings=self.state_sharding)(variables)

    def abstract_state(self) -> TrainState:
        """The state as ShapeDtypeStructs (with their shardings under a mesh): what
        `step.trace` takes to compile without memory."""
        state = jax.eval_shape(lambda v: TrainState.start(v, self.tx), unbox(self.boxed))
        if self.mesh is None:
            return state
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                            self.state_sharding)


def train_step(model_cfg, tcfg, mesh: Mesh | None = None, rules: str = "fsdp", donate: bool = True) -> TrainStep:
    """`python -m train`'s training step for `model_cfg` and `tcfg` (a TrainConfig).

    As the trainer does, the model's 'auto' implementation fields are resolved for the
    platform of the devices the step is compiled for (the mesh's, else the default
    device's). With `mesh` the state is sharded by the logical-axis rules preset `rules`,
    the batch over ('data', 'fsdp', 'expert'), and activations follow the same rules.
    """
    model = Transformer(impl.resolve(model_cfg, impl.platform_of(mesh)))
    boxed = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, tcfg.seq_len), jnp.int32))
    tx, schedule = make_optimizer(tcfg, boxed["params"])
    donated = (0,) if donate else ()
    if mesh is None:
        step = jax.jit(make_train_step(model, tx, tcfg, schedule), donate_argnums=donated)
        return TrainStep(model, tx, step, boxed, None, None, None)
    state_sh = state_shardings(boxed, tx, mesh, rules)
    batch_sh = NamedSharding(mesh, P(("data", "fsdp", "expert")))
    step = jax.jit(make_train_step(model, tx, tcfg, schedule, activation_rules(rules)),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=donated)
    return TrainStep(model, tx, step, boxed, mesh, state_sh, batch_sh)


def random_batch(vocab_size: int, batch: int, seq_len: int, rng: int | np.random.Generator = 0) -> dict:
    """A language-model batch of random tokens in [2, vocab_size): `inputs` and `targets`
    int32 [batch, seq_len], the targets the inputs shifted by one. rng: a seed or a
    numpy Generator (which the draw advances)."""
    tokens = np.random.default_rng(rng).integers(2, vocab_size, (batch, seq_len + 1))
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Wall seconds of each no-argument callable, called in turn `reps` times (each call
    timed until its result is ready), so that load on a shared machine falls on all alike."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def median(xs) -> float:
    return float(np.median(xs))


def emit(line: dict) -> None:
    """Prints a benchmark's JSON line (what `python -m bench` collects)."""
    print(json.dumps(line), flush=True)
