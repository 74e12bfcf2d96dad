"""Training utilities (not needed to load a model).

- `data`: one loader for Hub ids and local folders, the resumable training stream, augmentation, collation;
- `prepare`: raw sets of ../shared/data to `datasets` folders (scripts/prepare_data.py);
- `optim`: AdamW with layer-wise lr decay, warm-up then polynomial decay;
- `loop`: the Accelerate training loop and evaluation (scripts/train.py, scripts/evaluate.py);
- `trainer`: pieces for `transformers.Trainer`;
- `hub`: model card and upload;
- `mask_annealing`: EoMT's annealing of masked attention (exported here and from the package).

Only `mask_annealing` is imported with the package; import the others by module (they pull in `datasets`).
"""

from .mask_annealing import (
    MaskAnnealingCallback,
    annealing_windows,
    mask_annealing_probabilities,
    set_mask_annealing,
)

__all__ = ["MaskAnnealingCallback", "annealing_windows", "mask_annealing_probabilities", "set_mask_annealing"]
