"""Semantic segmentation: mean IoU from a confusion matrix that accumulates batch by batch.

The definitions are those of `evaluate`'s `mean_iou` (which follows mmsegmentation), with one difference:
a pixel is scored only where its reference label is valid, and a reference label is ignored when it equals
`ignore_index` *or is negative*. Trainer pads label maps with -100 when it concatenates maps of different
sizes; evaluate's module ignores a single index and would count that padding as wrong pixels.

With C[r, p] the number of scored pixels of reference class r predicted as class p, pooled over all images
(not averaged per image):

    IoU_c      = C[c, c] / (sum_p C[c, p] + sum_r C[r, c] - C[c, c])   nan if class c is in neither map
    accuracy_c = C[c, c] / sum_p C[c, p]                                nan if class c is not in the reference
    mean_iou = nanmean_c IoU_c    mean_accuracy = nanmean_c accuracy_c    overall_accuracy = trace(C) / sum(C)
"""

import warnings
from collections.abc import Mapping

import numpy as np
import torch

from ._inputs import as_integer_array, check_same_shape, paired


class MeanIoU:
    """Running confusion matrix behind `mean_iou`: `update()` it batch by batch, then `compute()`.

    For a Trainer `compute_metrics` with `batch_eval_metrics=True` or an Accelerate loop: pass each batch's
    predicted and label maps (device tensors are fine; they are counted on the CPU, with NumPy, which is
    far faster there than torch's bincount), and with several processes gather them first
    (`accelerator.gather_for_metrics`). Only the (num_labels, num_labels) matrix is kept.

    Args:
        num_labels: number of classes; scored reference labels and predictions lie in [0, num_labels).
        ignore_index: the reference label that is not scored (negative labels never are); None for none.
        label_map: {old: new} applied to the reference labels first, all at once.
        reduce_labels: then reference label 0 is ignored and every other label drops by one (ADE20K's
            "0 = other", the image processors' `do_reduce_labels`); `ignore_index` keeps being ignored.
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int | None = 255,
        label_map: Mapping[int, int] | None = None,
        reduce_labels: bool = False,
    ):
        if num_labels < 1:
            raise ValueError(f"mean_iou: num_labels must be at least 1, got {num_labels}")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.label_map = dict(label_map or {})
        self.reduce_labels = reduce_labels
        self.reset()

    def reset(self) -> None:
        # rows: reference class, columns: predicted class; None until the first update
        self.confusion_matrix: np.ndarray | None = None

    def update(self, predictions, references) -> None:
        """Count one batch: a pair of arrays or tensors of equal shape ((B, H, W) or (H, W)), or two equally
        long sequences of (H, W) maps whose sizes may differ from image to image."""
        if isinstance(predictions, (torch.Tensor, np.ndarray)):
            pairs, names = [(predictions, references)], ["mean_iou"]
        else:
            pairs = paired("mean_iou", predictions, references)
            names = [f"mean_iou: image {index}" for index in range(len(pairs))]
        for name, (prediction, reference) in zip(names, pairs):
            prediction = as_integer_array(prediction, f"{name}: prediction")
            self._count(prediction, as_integer_array(reference, f"{name}: reference"), name)

    def _count(self, prediction: np.ndarray, reference: np.ndarray, name: str) -> None:
        check_same_shape(prediction.shape, reference.shape, name)
        reference = reference.astype(np.int64)  # a copy: unsigned labels would wrap below 0 in reduce_labels
        if self.label_map:
            mapped = reference.copy()
            for old, new in self.label_map.items():
                mapped[reference == old] = new
            reference = mapped
        scored = reference >= 0
        if self.ignore_index is not None:
            scored &= reference != self.ignore_index
        if self.reduce_labels:
            scored &= reference != 0
            reference -= 1
        prediction, reference = prediction[scored].astype(np.int64), reference[scored]
        for role, labels in (("prediction", prediction), ("reference", reference)):
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_labels):
                raise ValueError(
                    f"{name}: {role} labels on scored pixels must lie in [0, {self.num_labels}), got values from "
                    f"{labels.min()} to {labels.max()} (ignore_index={self.ignore_index}; negative reference "
                    "labels are ignored)"
                )
        counts = np.bincount(reference * self.num_labels + prediction, minlength=self.num_labels**2)
        counts = counts.reshape(self.num_labels, self.num_labels)
        self.confusion_matrix = counts if self.confusion_matrix is None else self.confusion_matrix + counts

    def compute(self, nan_to_num: float | None = None) -> dict:
        """The scores of everything counted since the last `reset()` (module docstring); `nan_to_num` replaces
        the nan of absent classes, in the per-class arrays and the means."""
        if self.confusion_matrix is None:
            raise ValueError("mean_iou: nothing to compute, update() was never called")
        matrix = self.confusion_matrix.astype(np.float64)
        intersection = np.diag(matrix)
        reference_area, predicted_area = matrix.sum(axis=1), matrix.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersection / (reference_area + predicted_area - intersection)
            accuracy = intersection / reference_area
            overall_accuracy = intersection.sum() / reference_area.sum()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean when no class occurs at all: nan
            scores = {
                "mean_iou": np.nanmean(iou),
                "mean_accuracy": np.nanmean(accuracy),
                "overall_accuracy": overall_accuracy,
                "per_category_iou": iou,
                "per_category_accuracy": accuracy,
            }
        if nan_to_num is not None:
            scores = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in scores.items()}
        return scores


def mean_iou(
    predictions,
    references,
    num_labels: int,
    ignore_index: int | None = 255,
    nan_to_num: float | None = None,
    label_map: Mapping[int, int] | None = None,
    reduce_labels: bool = False,
) -> dict:
    """Mean IoU of predicted class maps against reference class maps.

    Args:
        predictions: per image an (H, W) map of predicted class ids (NumPy array, torch tensor or PIL image;
            sizes may differ between images), or one (B, H, W) array or tensor.
        references: the reference class maps, shaped like `predictions`.
        num_labels: number of classes.
        ignore_index: reference label that is not scored, default 255; negative labels (Trainer's -100
            padding) are never scored.
        nan_to_num: replaces the nan of absent classes.
        label_map: {old: new} applied to the reference labels first.
        reduce_labels: reference 0 becomes ignored and every other label drops by one (ADE20K convention).

    Returns:
        `mean_iou`, `mean_accuracy`, `overall_accuracy` (float64) and `per_category_iou`,
        `per_category_accuracy` (float64 arrays of length num_labels, nan for absent classes): the keys of
        `evaluate`'s mean_iou. Definitions in `native_seg_hf.metrics.semantic`.

    Raises:
        ValueError: no maps, unequal counts or shapes, non-integer maps, or labels outside [0, num_labels)
            on scored pixels.
    """
    metric = MeanIoU(num_labels, ignore_index, label_map, reduce_labels)
    metric.update(predictions, references)
    return metric.compute(nan_to_num)
