"""Evaluation metrics: semantic (mean IoU), panoptic (PQ) and grouping (superpixel) quality.

Each metric comes three ways, all computed by the same code:

- a one-shot function: `mean_iou(predictions, references, num_labels, ignore_index=255, ...)`,
  `panoptic_quality(predictions, references, prediction_segments_info, reference_segments_info, categories)`,
  `grouping_metrics(predictions, references, boundary_tolerance=2)`;
- an accumulator to `update()` batch by batch and `compute()` at the end, for Trainer's `batch_eval_metrics`
  and Accelerate loops: `MeanIoU`, `PanopticQuality`, `GroupingMetrics` (they take NumPy arrays or torch tensors);
- an `evaluate` module, loaded offline by path: `load_metric("mean_iou")`, `load_metric("panoptic_quality")`,
  `load_metric("grouping_metrics")` (the scripts live in `native_seg_hf/metrics/modules/`).

The definitions are in the docstrings of `semantic`, `panoptic` and `grouping`. In short: mean IoU pools a
confusion matrix over all pixels and ignores `ignore_index` and negative labels (Trainer's -100); PQ follows
panopticapi (match at IoU > 0.5, void and crowd rules); ASA, boundary recall (tolerance 2 px, square window)
and undersegmentation error (Neubert-Protzel) are averaged over each image's human segmentations, then over
the images. Invalid input raises ValueError naming the metric, the image and the problem.

For Trainer, `native_seg_hf.training.trainer.MeanIoUMetrics` is a `compute_metrics` built on `MeanIoU` for
`batch_eval_metrics=True` (Trainer's -100 label padding is ignored).
"""

import os

from .grouping import (
    GroupingMetrics,
    achievable_segmentation_accuracy,
    boundary_recall,
    grouping_metrics,
    undersegmentation_error,
)
from .panoptic import PanopticQuality, panoptic_quality
from .semantic import MeanIoU, mean_iou

METRIC_NAMES = ("mean_iou", "panoptic_quality", "grouping_metrics")
MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modules")


def load_metric(name: str, **kwargs):
    """The `evaluate` module `name` (one of `METRIC_NAMES`), loaded by path, so it works offline
    (`HF_HUB_OFFLINE=1`); `kwargs` go to `evaluate.load` (e.g. `keep_in_memory`, `num_process`, `process_id`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; the metrics are {', '.join(METRIC_NAMES)}")
    import evaluate  # imports datasets, which takes seconds: only when a module is asked for

    return evaluate.load(os.path.join(MODULES_DIR, f"{name}.py"), **kwargs)


__all__ = [
    "METRIC_NAMES",
    "GroupingMetrics",
    "MeanIoU",
    "PanopticQuality",
    "achievable_segmentation_accuracy",
    "boundary_recall",
    "grouping_metrics",
    "load_metric",
    "mean_iou",
    "panoptic_quality",
    "undersegmentation_error",
]
