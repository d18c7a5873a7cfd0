"""Meshes, logical-axis rules and multi-host start-up. Knows no model."""

from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import (PRESETS, ShardingError, activation_rules, logical_to_sharding,
                            tree_shardings)

__all__ = ["MeshConfig", "make_mesh", "PRESETS", "ShardingError", "activation_rules",
           "logical_to_sharding", "tree_shardings"]
