"""Mesh construction, the logical-axis sharding rules and the mesh presets."""

from peftjax.sharding.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    batch_sharding,
    check_axes,
    check_rules,
    logical_to_spec,
    make_mesh,
    replicate_unplaced,
    state_shardings,
)
from peftjax.sharding.presets import (
    PRESETS,
    check_batch_sizes,
    mesh_from_config,
    mesh_shape,
    preset_shape,
)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "PRESETS", "batch_sharding", "check_axes",
           "check_batch_sizes", "check_rules", "logical_to_spec", "make_mesh", "mesh_from_config",
           "mesh_shape", "preset_shape", "replicate_unplaced", "state_shardings"]
