"""Mesh construction and logical-axis sharding rules."""

from peftjax.sharding.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    replicate_unplaced,
    state_shardings,
)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "batch_sharding", "logical_to_spec", "make_mesh",
           "replicate_unplaced", "state_shardings"]
