"""Logical axis names -> mesh axes.

Modules annotate parameters and activations with words (`batch`, `embed`, `heads`, ...);
the rules here place them on the mesh. Parameter rules are kept apart from activation
rules. `logical_to_sharding` refuses a placement where two logical axes of one array land
on the same mesh axis, or where a dimension does not divide its mesh axes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, tuple[str, ...]], ...]


class ShardingError(ValueError):
    """A placement that cannot work; the message names the array and axis."""


_BATCH = ("data", "fsdp", "expert")
PRESETS: dict[str, dict[str, Rules]] = {
    # Pure data parallelism: parameters replicated, batch split over every axis.
    "dp": {"params": (), "activations": (("batch", _BATCH),)},
    # ZeRO-3: parameters and optimizer state split on their model dimension over fsdp;
    # routed experts over expert.
    "fsdp": {"params": (("embed", ("fsdp",)), ("experts", ("expert",))),
             "activations": (("batch", _BATCH), ("experts", ("expert",)))},
    # fsdp + tensor parallelism over heads, MLP and expert hidden units, and the vocabulary.
    "fsdp_tp": {"params": (("embed", ("fsdp",)), ("heads", ("tensor",)), ("mlp", ("tensor",)),
                           ("expert_mlp", ("tensor",)), ("vocab", ("tensor",)), ("experts", ("expert",))),
                "activations": (("batch", _BATCH), ("heads", ("tensor",)), ("mlp", ("tensor",)),
                                ("expert_mlp", ("tensor",)), ("vocab", ("tensor",)), ("experts", ("expert",)))},
    # fsdp + expert parallelism, tensor parallelism inside attention and the MLPs.
    "fsdp_ep": {"params": (("embed", ("fsdp",)), ("experts", ("expert",)), ("heads", ("tensor",)),
                           ("mlp", ("tensor",)), ("expert_mlp", ("tensor",))),
                "activations": (("batch", _BATCH), ("heads", ("tensor",)), ("mlp", ("tensor",)),
                                ("expert_mlp", ("tensor",)), ("experts", ("expert",)))},
}


def _preset(name: str) -> dict[str, Rules]:
    if name not in PRESETS:
        raise ShardingError(f"unknown sharding rules preset {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name]


def activation_rules(preset: str) -> Rules:
    """Rules for `nn.logical_axis_rules` around the model call (activation constraints)."""
    return _preset(preset)["activations"]


def logical_to_sharding(names, shape, mesh: Mesh, rules: Rules, what: str = "array") -> NamedSharding:
    """NamedSharding for one array with logical axis `names` and `shape`."""
    table = dict(rules)
    used: dict[str, str] = {}
    spec = []
    for dim, name in zip(shape, names):
        axes = tuple(a for a in table.get(name, ()) if mesh.shape[a] > 1)
        for a in axes:
            if a in used:
                raise ShardingError(f"{what}: logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r}")
            used[a] = name
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        if dim % size:
            raise ShardingError(f"{what}: axis {name!r} of size {dim} does not divide mesh axes {axes} "
                                f"of total size {size}")
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return NamedSharding(mesh, P(*spec))


def tree_shardings(abstract_boxed, mesh: Mesh, preset: str):
    """Shardings for a tree of boxed (nn.LogicallyPartitioned) abstract arrays.

    Leaves without logical names are replicated. Returns an unboxed tree of NamedSharding.
    """
    rules = _preset(preset)["params"]

    def one(path, leaf):
        what = jax.tree_util.keystr(path)
        if isinstance(leaf, nn.LogicallyPartitioned):
            return logical_to_sharding(leaf.names, leaf.value.shape, mesh, rules, what)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_boxed,
                                            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
