"""Training utilities (not needed to load a model)."""

from .mask_annealing import (
    MaskAnnealingCallback,
    annealing_windows,
    mask_annealing_probabilities,
    set_mask_annealing,
)

__all__ = ["MaskAnnealingCallback", "annealing_windows", "mask_annealing_probabilities", "set_mask_annealing"]
