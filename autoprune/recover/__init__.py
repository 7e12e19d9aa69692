"""Recovery of a pruned model: layer-wise reconstruction, hidden-state distillation and the
dense teacher's cached outputs."""

from autoprune.recover._hidden import capture_blocks, hidden_loss, main_blocks
from autoprune.recover._reconstruct import (
    LayerFit,
    ReconstructionReport,
    calibration_batches,
    reconstruct_,
    reconstruct_plan_,
)
from autoprune.recover._teacher import TeacherCache

__all__ = ["LayerFit", "ReconstructionReport", "TeacherCache", "calibration_batches",
           "capture_blocks", "hidden_loss", "main_blocks", "reconstruct_", "reconstruct_plan_"]
