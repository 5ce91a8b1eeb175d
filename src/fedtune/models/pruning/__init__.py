"""Client-specific structured pruning of a decoder-only base model, and adapters mapped between sizes.

A client with pruning rate ``rho`` trains LoRA on a *really smaller* copy of the frozen base model: in every block
it keeps the ``1 - rho`` most important MLP channels and/or attention heads (:class:`PruneMask`), so its forward and
backward FLOPs, its memory and its LoRA payload all shrink, and all three are measured on the pruned model.

- :mod:`.importance`: the score registry (:data:`PRUNING_METHODS`), calibration statistics and :func:`compute_mask`;
- :mod:`.surgery`: the pruned model (:func:`build_pruned_model`), its cost, and the per-run :class:`Pruner`;
- :mod:`.adapters`: LoRA adapters sliced to a pruned model and expanded back (:func:`slice_adapter`);
- :mod:`.layout`: where a model's blocks and prunable modules are (Llama-style or GPT-2).
"""

from fedtune.models.pruning.adapters import expand_adapter, slice_adapter, state_bytes
from fedtune.models.pruning.importance import (
                                               CALIBRATED_METHODS,
                                               MAX_RATE,
                                               PRUNING_METHODS,
                                               TARGETS,
                                               BlockMask,
                                               FeatureStats,
                                               ModuleMask,
                                               PruneMask,
                                               Scorer,
                                               activation_stats,
                                               compute_mask,
                                               kept_count,
)
from fedtune.models.pruning.layout import PEFT_PREFIX
from fedtune.models.pruning.surgery import Pruner, attach_like, attention_dims, build_pruned_model, pruned_cost

__all__ = [
    "BlockMask", "CALIBRATED_METHODS", "FeatureStats", "MAX_RATE", "ModuleMask", "PEFT_PREFIX", "PRUNING_METHODS",
    "PruneMask", "Pruner", "Scorer", "TARGETS", "activation_stats", "attach_like", "attention_dims",
    "build_pruned_model", "compute_mask", "expand_adapter", "kept_count", "pruned_cost", "slice_adapter",
    "state_bytes",
]
