"""Meshes, logical-axis rules and multi-host start-up. Knows no model."""

from sharding.mesh import MeshConfig, initialize_distributed, make_mesh
from sharding.rules import (PRESETS, ShardingError, activation_rules, logical_to_sharding,
                            logical_to_spec, per_device_bytes, tree_shardings)

__all__ = ["MeshConfig", "make_mesh", "initialize_distributed", "PRESETS", "ShardingError",
           "activation_rules", "logical_to_sharding", "logical_to_spec", "per_device_bytes", "tree_shardings"]
