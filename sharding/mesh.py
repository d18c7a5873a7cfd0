"""Device meshes with the axes `data`, `fsdp`, `expert`, `tensor`, and multi-host start-up."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take the devices left over.

    Attributes:
      data: pure data parallelism (parameters replicated).
      fsdp: data parallelism with parameters and optimizer state sharded (ZeRO-3).
      expert: expert parallelism (routed experts split across devices).
      tensor: tensor parallelism over attention heads and MLP hidden units.
      rules: logical-axis rule preset (see sharding.rules.PRESETS).
    """

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    rules: str = "fsdp"

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Resolved axis sizes for `num_devices`; raises ValueError when they cannot fit."""
        raw = {a: getattr(self, a) for a in AXES}
        for a, v in raw.items():
            if v == 0 or v < -1:
                raise ValueError(f"mesh.{a}={v} must be a positive size or -1")
        fill = [a for a, v in raw.items() if v == -1]
        if len(fill) > 1:
            raise ValueError(f"only one mesh axis may be -1, got {fill}")
        fixed = math.prod(v for v in raw.values() if v != -1)
        if fill:
            if num_devices % fixed:
                raise ValueError(f"mesh sizes {raw} do not divide the {num_devices} devices")
            raw[fill[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(f"mesh sizes {raw} use {fixed} devices but {num_devices} are present")
        return raw


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes data, fsdp, expert, tensor."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.sizes(len(devices))
    shape = tuple(sizes[a] for a in AXES)
    if len(devices) == jax.device_count():  # the whole machine: let jax follow the topology
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    else:  # a subset (tests, notebooks): in the order given
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, AXES)


def initialize_distributed(coordinator=None, num_processes=None, process_id=None) -> None:
    """jax.distributed start-up: from explicit flags, or from the cluster's environment
    (TPU pods, SLURM, Open MPI) where jax finds it. CPU processes talk over gloo."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator, --num-processes and --process-id go together")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return
    env = os.environ
    sizes = [int(env.get(k) or 1) for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")]
    if (env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS")
            or "," in env.get("TPU_WORKER_HOSTNAMES", "") or max(sizes) > 1):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
