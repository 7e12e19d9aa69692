"""Applying pruning plans: structured removal (Torch-Pruning) and unstructured masks."""

from autoprune.prune._apply import (
    PruneReport,
    WeightMask,
    apply_plan,
    bake_masks_,
    baked_copy,
    count_kept,
    group_rule,
    has_masks,
    prune_model_,
)
from autoprune.prune._conv1d import conv1d_to_linear_
from autoprune.prune._depth import PassThrough, drop_blocks_, droppable_blocks, rank_blocks
from autoprune.prune._groups import (
    ModelInspection,
    PrunableGroup,
    Unprunable,
    grouped_advice,
    inspect_model,
    layer_costs,
)

__all__ = [
    "ModelInspection",
    "PassThrough",
    "PrunableGroup",
    "PruneReport",
    "WeightMask",
    "Unprunable",
    "apply_plan",
    "bake_masks_",
    "conv1d_to_linear_",
    "drop_blocks_",
    "droppable_blocks",
    "baked_copy",
    "count_kept",
    "group_rule",
    "grouped_advice",
    "has_masks",
    "inspect_model",
    "layer_costs",
    "prune_model_",
    "rank_blocks",
]
