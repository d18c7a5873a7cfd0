"""The devices of a TPU slice that is not here, for compiling programs ahead of time.

libtpu (`pip install "dsjax[tpu]"`) carries XLA:TPU's compiler; given a topology name as
libtpu spells it (`v5p:8x8x8`, `v5e:4x4`, `v6e:2x2`, `v4:2x2x1`, ...) it describes the
slice's chips as compile-only devices, with no TPU attached. A mesh of them lowers and
compiles `jax.jit` programs for that slice on any machine (a CPU-only host included):
`compiled.memory_analysis()` and `compiled.as_text()` are XLA:TPU's own figures and HLO.

`topology_devices` gives the devices, `topology_mesh` a mesh of them with the axes of
`sharding.mesh`, `hbm_gib` a chip's memory from its device kind. Knows no model.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
from jax.sharding import Mesh

from sharding.mesh import AXES, MeshConfig

INSTALL = 'pip install "dsjax[tpu]"'

# HBM per chip (GiB) by the device kind libtpu reports, most specific first: v4 ("TPU v4")
# 32 GiB, v5e ("TPU v5 lite") 16, v5p ("TPU v5") 95, v6e ("TPU v6 lite", Trillium) 32.
HBM_GIB = (("v6 lite", 32.0), ("v6e", 32.0), ("v5 lite", 16.0), ("v5e", 16.0), ("v5p", 95.0), ("v5", 95.0),
           ("v4", 32.0))


class TopologyUnavailable(RuntimeError):
    """libtpu is not installed: no TPU compiler on this machine."""


def have_libtpu() -> bool:
    """Whether libtpu (XLA:TPU's compiler) is installed."""
    return importlib.util.find_spec("libtpu") is not None


@functools.lru_cache(maxsize=None)
def topology_devices(name: str) -> tuple:
    """The compile-only devices of the TPU slice `name` (e.g. 'v5p:2x2x1'), one per chip.

    Raises TopologyUnavailable without libtpu and ValueError for a name libtpu does not
    know. Sets, where the environment leaves them unset, TPU_SKIP_MDS_QUERY=1 (no
    question to a cloud metadata server: this host need not be a TPU VM) and
    ALLOW_MULTIPLE_LIBTPU_LOAD=1 (libtpu takes a lock file per process; compiling only,
    several processes may hold it, e.g. test workers)."""
    if not have_libtpu():
        raise TopologyUnavailable(f"compiling for a TPU topology needs libtpu: {INSTALL}")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental.topologies import get_topology_desc

    if not isinstance(name, str) or ":" not in name:
        raise ValueError(f"unknown TPU topology {name!r}: give it as libtpu names it, e.g. v5p:2x2x1, v5e:2x4, "
                         f"v6e:2x2, v4:2x2x1")
    try:
        devices = tuple(get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001  (libtpu raises its own runtime errors for bad names)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"unknown TPU topology {name!r}: {first[:300]}") from None
    if not devices:
        raise ValueError(f"unknown TPU topology {name!r}: libtpu describes no chips")
    return devices


def hbm_gib(device) -> float:
    """A TPU chip's HBM in GiB, from its `device_kind`; ValueError for a kind not listed."""
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, gib in HBM_GIB:
        if key in kind:
            return gib
    raise ValueError(f"no HBM size known for the TPU device kind {kind!r}")


def chips(name: str) -> int:
    """Chips of the slice `name`: the product of its dimensions ('v5p:2x2x1' -> 4)."""
    count = 1
    for dim in name.split(":", 1)[1].split("x"):
        count *= int(dim)
    return count


def device_hbm_gib(name: str) -> float:
    """HBM in GiB of one device of the slice `name`: a chip's, shared by the devices libtpu
    makes of one chip (a v4 slice described core by core: 2 devices per chip)."""
    devices = topology_devices(name)
    return hbm_gib(devices[0]) * chips(name) / len(devices)


def topology_mesh(cfg: MeshConfig, name: str) -> Mesh:
    """A Mesh with the axes `AXES` over the chips of the TPU slice `name`, sized by `cfg`
    (one axis may be -1), laid out on the slice's physical torus by
    `jax.experimental.mesh_utils` where it can (it raises ValueError, NotImplementedError or
    AssertionError for a shape it cannot lay on the torus), else in the chips' order.
    ValueError when the sizes do not fit the slice."""
    from jax.experimental import mesh_utils

    devices = list(topology_devices(name))
    sizes = cfg.sizes(len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.array(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)
