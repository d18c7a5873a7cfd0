"""Checkpoints of training state with orbax (async saves, keep the last N, exact resume),
and the reading of a `python -m train` run directory.

Each checkpoint holds the state pytree (params, optimizer state, `moe_bias`, step) and a
small JSON item (the data iterator position and anything else a run needs to resume).
A run directory (`config.yaml` + `checkpoints/`) is a public format: `read_run_config`
is the one reader of its config.yaml, and `load_trained` reads its parameters and router
bias onto any device count or mesh, into whatever module the caller names.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Orbax CheckpointManager over `directory`.

    Args:
      directory: where step folders go (created if needed).
      keep: how many most recent checkpoints to keep.
      async_save: write in the background while training continues.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, extra: dict) -> None:
        """Starts saving `state` and the JSON-able `extra` as checkpoint `step`."""
        self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      extra=ocp.args.JsonSave(extra)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores checkpoint `step` into the shapes, dtypes and shardings of `abstract_state`."""
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                              abstract_state)
        out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                               extra=ocp.args.JsonRestore()))
        return out["state"], out["extra"]

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def restore_variables(directory: str, target: dict, step: int | None = None) -> tuple[dict, int]:
    """Parameters and router bias of a training checkpoint, without its optimizer state.

    Args:
      directory: a `checkpoints/` folder written by `Checkpointer`.
      target: {'params': ..., 'moe_bias': ...} of jax.ShapeDtypeStruct with the shardings
        to restore onto (any device count or mesh: orbax reads each shard's slice).
      step: the checkpoint (default: the latest).
    Returns ({'params', 'moe_bias'}, step). Raises FileNotFoundError with a one-line message,
    also when the checkpoint lacks an array of `target` (it holds another model).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist")
    mngr = ocp.CheckpointManager(os.path.abspath(directory))
    step = mngr.latest_step() if step is None else step
    mngr.close()
    if step is None:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint")
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    out = ocp.PyTreeCheckpointer().restore(
        os.path.join(os.path.abspath(directory), str(step), "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
    missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(out)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise FileNotFoundError(f"{directory} step {step} holds no {missing[0]}"
                                + (f" (nor {len(missing) - 1} more arrays)" if len(missing) > 1 else "")
                                + ": a checkpoint of another model")
    return {"params": out["params"], "moe_bias": out.get("moe_bias") or {}}, int(step)


def read_run_config(workdir: str) -> dict:
    """The run config a `python -m train` run directory holds (its config.yaml: `stage`
    and one mapping per section). Raises FileNotFoundError for a directory without one."""
    import yaml

    path = os.path.join(workdir, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a training workdir (no config.yaml)")
    with open(path) as f:
        run = yaml.safe_load(f) or {}
    if not isinstance(run, dict):
        raise ValueError(f"{path} is not a run config (a mapping of sections)")
    return run


def run_model_config(workdir: str, run: dict | None = None):
    """The ModelConfig of a `python -m train` run directory (its config.yaml's model section,
    or `run`'s when the caller has read it), with the platform choices back on 'auto'
    (`dsjax.impl.unresolved`): they are made again for the devices that read it."""
    from dsjax.config import config_from_dict
    from dsjax.impl import unresolved

    run = read_run_config(workdir) if run is None else run
    return unresolved(config_from_dict(run.get("model") or {}))


def load_trained(workdir: str, step: int | None = None, shardings: Any = None, module: type | None = None):
    """The model and its variables from a `python -m train` workdir, on this machine's devices.

    Reads `config.yaml` (the resolved run config) and the latest (or given) checkpoint's
    parameters and router bias only (not the optimizer moments), whatever the device
    count or mesh that wrote it: onto the first local device, or onto `shardings` (a
    sharding for every leaf, or a pytree of them matching {'params', 'moe_bias'}).

    Args:
      workdir: the run directory.
      step: the checkpoint (default: the latest).
      shardings: where the arrays go (default: the first local device).
      module: the flax Module class built from the run's model config (default
        dsjax.Transformer); its parameters are the ones read, so a module with extra
        heads (dsjax.reward_model.RewardModel) reads them too.
    Returns:
      (module instance, {'params', 'moe_bias'}, run config dict with the restored step
      added as 'checkpoint_step'). Raises FileNotFoundError with a one-line message.

        model, variables, run = dsjax.load_trained("workdir")
    """
    from dsjax.model import Transformer, unbox

    run = read_run_config(workdir)
    model = (module or Transformer)(run_model_config(workdir, run))
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir} has no checkpoints/")
    abstract = unbox(jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), "int32")))
    abstract = {"params": abstract["params"], "moe_bias": abstract.get("moe_bias", {})}
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
    variables, step = restore_variables(directory, target, step)
    if not variables["moe_bias"]:
        variables.pop("moe_bias")
    return model, variables, {**run, "checkpoint_step": int(step)}
