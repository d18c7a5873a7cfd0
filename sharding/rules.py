"""Logical axis names -> mesh axes.

Modules annotate parameters and activations with words (`batch`, `embed`, `heads`, ...);
the rules here place them on the mesh. Parameter rules are kept apart from activation
rules. No two logical axes of one array land on the same mesh axis (`logical_to_spec`),
and a dimension that does not divide its mesh axes is an error naming the array.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, tuple[str, ...]], ...]


class ShardingError(ValueError):
    """A placement that cannot work; the message names the array and axis."""


_BATCH = ("data", "fsdp", "expert")
# FSDP shards every large parameter on one axis: its model dimension (`embed`) where it
# has one, else its compressed input (`q_lora`, `kv_lora` of the up-projections).
_FSDP = (("embed", ("fsdp",)), ("q_lora", ("fsdp",)), ("kv_lora", ("fsdp",)), ("mtp_concat", ("fsdp",)))
_TP = (("heads", ("tensor",)), ("mlp", ("tensor",)), ("expert_mlp", ("tensor",)))
PRESETS: dict[str, dict[str, Rules]] = {
    # Pure data parallelism: parameters replicated, batch split over every axis.
    "dp": {"params": (), "activations": (("batch", _BATCH),)},
    # ZeRO-3: parameters and optimizer state split over fsdp; routed experts over expert.
    "fsdp": {"params": _FSDP + (("experts", ("expert",)),),
             "activations": (("batch", _BATCH), ("experts", ("expert",)))},
    # fsdp + tensor parallelism over heads, MLP and expert hidden units, and the vocabulary.
    "fsdp_tp": {"params": _TP + (("vocab", ("tensor",)),) + _FSDP + (("experts", ("expert",)),),
                "activations": (("batch", _BATCH),) + _TP + (("vocab", ("tensor",)), ("experts", ("expert",)))},
    # fsdp + expert parallelism, tensor parallelism inside attention and the MLPs.
    "fsdp_ep": {"params": _TP + _FSDP + (("experts", ("expert",)),),
                "activations": (("batch", _BATCH),) + _TP + (("experts", ("expert",)),)},
}


def _preset(name: str) -> dict[str, Rules]:
    if name not in PRESETS:
        raise ShardingError(f"unknown sharding rules preset {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name]


def activation_rules(preset: str) -> Rules:
    """Rules for `nn.logical_axis_rules` around the model call (activation constraints)."""
    return _preset(preset)["activations"]


def logical_to_spec(names, shape, mesh_shape: dict[str, int], rules: Rules, what: str = "array",
                    strict: bool = True) -> P:
    """PartitionSpec for one array with logical axis `names`; mesh axes of size 1 are skipped.

    Two logical axes of one array never land on the same mesh axis: with `strict` that is
    an error naming both; otherwise (parameters) the first axis, left to right, keeps the
    mesh axis and the later one stays whole, so `(embed, q_lora)` shards `embed` while
    `(q_lora, heads, head_dim)` shards `q_lora`. A dimension that does not divide its
    mesh axes is an error.
    """
    table = dict(rules)
    used: dict[str, str] = {}
    spec = []
    for dim, name in zip(shape, names):
        axes = tuple(a for a in table.get(name, ()) if mesh_shape[a] > 1)
        taken = [a for a in axes if a in used]
        if taken and strict:
            raise ShardingError(f"{what}: logical axes {used[taken[0]]!r} and {name!r} both map to mesh "
                                f"axis {taken[0]!r}")
        if taken:
            axes = ()
        for a in axes:
            used[a] = name
        size = 1
        for a in axes:
            size *= mesh_shape[a]
        if dim % size:
            raise ShardingError(f"{what}: axis {name!r} of size {dim} does not divide mesh axes {axes} "
                                f"of total size {size}")
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def logical_to_sharding(names, shape, mesh: Mesh, rules: Rules, what: str = "array") -> NamedSharding:
    """NamedSharding for one array with logical axis `names` and `shape`."""
    return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape), rules, what))


def per_device_bytes(abstract_boxed, mesh_shape: dict[str, int], preset: str, dtype=None) -> int:
    """Bytes one device holds of a tree of boxed abstract arrays under the parameter rules
    of `preset`, for a mesh of `mesh_shape` (no devices needed). `dtype` overrides the
    leaves' own dtype (e.g. float32 optimizer moments of bfloat16 parameters)."""
    import numpy as np

    rules = _preset(preset)["params"]
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]:
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * len(value.shape)
        spec = logical_to_spec(names, value.shape, mesh_shape, rules, jax.tree_util.keystr(path), strict=False)
        count = 1
        for dim, axes in zip(value.shape, tuple(spec) + (None,) * len(value.shape)):
            split = 1
            for a in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
                split *= mesh_shape[a]
            count *= dim // split
        total += count * np.dtype(dtype or value.dtype).itemsize
    return total


def tree_shardings(abstract_boxed, mesh: Mesh, preset: str):
    """Shardings for a tree of boxed (nn.LogicallyPartitioned) abstract arrays.

    Leaves without logical names are replicated. Returns an unboxed tree of NamedSharding.
    """
    rules = _preset(preset)["params"]

    def one(path, leaf):
        what = jax.tree_util.keystr(path)
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, dict(mesh.shape), rules,
                                                       what, strict=False))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_boxed,
                                            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
