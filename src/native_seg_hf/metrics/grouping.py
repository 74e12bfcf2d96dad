"""Grouping metrics: how well native segments (superpixels) fit human segmentations such as BSDS500's.

For a predicted segmentation S (segments s) and one human segmentation G (segments g) of an N-pixel image:

- Achievable segmentation accuracy (Liu et al., CVPR 2011): the pixel accuracy of the best labelling that
  gives every predicted segment a single ground-truth segment. Higher is better, 1 at most.

      ASA(S, G) = (1/N) sum_s max_g |s ∩ g|

- Undersegmentation error as Neubert and Protzel (2012) define it, the form the superpixel benchmark of Stutz
  et al. (CVIU 2018) uses: every segment s that overlaps g is charged the smaller of its part inside g and its
  part outside it, so it has no threshold. Lower is better, 0 at least.

      UE(S, G) = (1/N) sum_g sum_{s ∩ g ≠ ∅} min(|s ∩ g|, |s \\ g|)

- Boundary recall with a tolerance of r pixels (default 2): the fraction of ground-truth boundary pixels with
  a predicted boundary pixel in the (2r+1) x (2r+1) square around them (Chebyshev distance <= r).

      BR(S, G) = |{p in B(G) : some q in B(S) with max(|p_y - q_y|, |p_x - q_x|) <= r}| / |B(G)|

  B(L) are the pixels of L with a 4-neighbour in another segment: both sides of every contour, as Stutz et
  al.'s benchmark marks them. BR is nan when G is a single segment (it has no boundary).

Several human segmentations per image (BSDS500 has 4 to 9): each metric is averaged over them, leaving out
nan, then over the images, each image weighing the same.
"""

import warnings
from collections.abc import Iterable

import numpy as np
import torch
from scipy import ndimage

from ._inputs import as_map, check_same_shape, paired

DEFAULT_BOUNDARY_TOLERANCE = 2


def _checked(segments, ground_truth, what: str) -> tuple[np.ndarray, np.ndarray]:
    segments, ground_truth = as_map(segments, f"{what}: segments"), as_map(ground_truth, f"{what}: ground truth")
    check_same_shape(segments.shape, ground_truth.shape, what)
    return segments, ground_truth


def _intersections(segments: np.ndarray, ground_truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every (s, g) that share pixels: the index of s and |s ∩ g|; and |s| for every s."""
    _, segment_index = np.unique(segments, return_inverse=True)
    _, truth_index = np.unique(ground_truth, return_inverse=True)
    segment_index, truth_index = segment_index.ravel(), truth_index.ravel()
    num_truths = int(truth_index.max()) + 1
    pairs, sizes = np.unique(segment_index * num_truths + truth_index, return_counts=True)
    return pairs // num_truths, sizes, np.bincount(segment_index)


def achievable_segmentation_accuracy(segments, ground_truth) -> float:
    """ASA of an (H, W) segment-id map against one (H, W) human segmentation (module docstring)."""
    segments, ground_truth = _checked(segments, ground_truth, "achievable_segmentation_accuracy")
    segment_of_pair, overlap, segment_area = _intersections(segments, ground_truth)
    best = np.zeros(len(segment_area), dtype=np.int64)
    np.maximum.at(best, segment_of_pair, overlap)
    return float(best.sum() / segments.size)


def undersegmentation_error(segments, ground_truth) -> float:
    """UE (Neubert and Protzel) of an (H, W) segment-id map against one human segmentation."""
    segments, ground_truth = _checked(segments, ground_truth, "undersegmentation_error")
    segment_of_pair, overlap, segment_area = _intersections(segments, ground_truth)
    return float(np.minimum(overlap, segment_area[segment_of_pair] - overlap).sum() / segments.size)


def boundary_pixels(labels: np.ndarray) -> np.ndarray:
    """Pixels of an (H, W) map with a 4-neighbour of another label (both sides of every contour)."""
    boundary = np.zeros(labels.shape, dtype=bool)
    vertical = labels[1:, :] != labels[:-1, :]
    horizontal = labels[:, 1:] != labels[:, :-1]
    boundary[1:, :] |= vertical
    boundary[:-1, :] |= vertical
    boundary[:, 1:] |= horizontal
    boundary[:, :-1] |= horizontal
    return boundary


def boundary_recall(segments, ground_truth, tolerance: int = DEFAULT_BOUNDARY_TOLERANCE) -> float:
    """BR of an (H, W) segment-id map against one human segmentation, within `tolerance` pixels; nan when
    the human segmentation has no boundary."""
    segments, ground_truth = _checked(segments, ground_truth, "boundary_recall")
    if tolerance < 0:
        raise ValueError(f"boundary_recall: the tolerance must be >= 0 pixels, got {tolerance}")
    truth_boundary = boundary_pixels(ground_truth)
    if not truth_boundary.any():
        return float("nan")
    window = np.ones((2 * tolerance + 1, 2 * tolerance + 1), dtype=bool)
    near_predicted = ndimage.binary_dilation(boundary_pixels(segments), structure=window)
    return float((truth_boundary & near_predicted).sum() / truth_boundary.sum())


def human_segmentations(reference, what: str) -> list[np.ndarray]:
    """One image's human segmentations, given as an (H, W) map, a (K, H, W) stack or a sequence of K maps,
    as a list of 2-D integer arrays."""
    if not isinstance(reference, (list, tuple)):
        reference = np.asarray(reference.cpu() if isinstance(reference, torch.Tensor) else reference)
        if reference.ndim == 2:
            reference = [reference]
    if len(reference) == 0:
        raise ValueError(f"{what}: no human segmentation was given")
    return [as_map(truth, f"{what}, human segmentation {k}") for k, truth in enumerate(reference)]


def _nanmean(values) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all nan (no boundary anywhere): nan
        return float(np.nanmean(values))


class GroupingMetrics:
    """Per-image scores behind `grouping_metrics`: `update()` them batch by batch, then `compute()`. With
    several processes, concatenate the `per_image` lists before `compute()`.

    Args:
        boundary_tolerance: r of the boundary recall, in pixels.
    """

    def __init__(self, boundary_tolerance: int = DEFAULT_BOUNDARY_TOLERANCE):
        if boundary_tolerance < 0:
            raise ValueError(f"grouping_metrics: the boundary tolerance must be >= 0 pixels, got {boundary_tolerance}")
        self.boundary_tolerance = boundary_tolerance
        self.reset()

    def reset(self) -> None:
        # one row per image: ASA, BR, UE (each averaged over the image's human segmentations), segment count
        self.per_image: list[tuple[float, float, float, int]] = []

    def update(self, predictions: Iterable, references: Iterable) -> None:
        """Score a batch: per image an (H, W) segment-id map, and its human segmentations as an (H, W) map,
        a (K, H, W) stack or a sequence of K maps of that size."""
        for index, (prediction, reference) in enumerate(paired("grouping_metrics", predictions, references)):
            what = f"grouping_metrics: image {index}"
            segments = as_map(prediction, f"{what}: prediction")
            scores = []
            for k, truth in enumerate(human_segmentations(reference, what)):
                check_same_shape(segments.shape, truth.shape, f"{what}, human segmentation {k}")
                scores.append(
                    (
                        achievable_segmentation_accuracy(segments, truth),
                        boundary_recall(segments, truth, self.boundary_tolerance),
                        undersegmentation_error(segments, truth),
                    )
                )
            asa, recall, error = (_nanmean(column) for column in zip(*scores))
            self.per_image.append((asa, recall, error, len(np.unique(segments))))

    def compute(self) -> dict:
        """Means over the images scored since the last `reset()`."""
        if not self.per_image:
            raise ValueError("grouping_metrics: nothing to compute, update() was never called")
        asa, recall, error, num_segments = zip(*self.per_image)
        return {
            "achievable_segmentation_accuracy": _nanmean(asa),
            "boundary_recall": _nanmean(recall),
            "undersegmentation_error": _nanmean(error),
            "mean_num_segments": float(np.mean(num_segments)),
        }


def grouping_metrics(predictions, references, boundary_tolerance: int = DEFAULT_BOUNDARY_TOLERANCE) -> dict:
    """Achievable segmentation accuracy, boundary recall and undersegmentation error of predicted segments
    against human segmentations, averaged over each image's human segmentations, then over the images.

    Args:
        predictions: per image an (H, W) map of segment ids (sizes may differ between images).
        references: per image its human segmentations: an (H, W) map, a (K, H, W) stack or K maps.
        boundary_tolerance: r of the boundary recall in pixels (Chebyshev distance), default 2.

    Returns:
        `achievable_segmentation_accuracy`, `boundary_recall`, `undersegmentation_error` (floats; the
        definitions are in `native_seg_hf.metrics.grouping`) and `mean_num_segments`, the mean number of
        predicted segments per image, which the three depend on.

    Raises:
        ValueError: no images, unequal counts, an image without human segmentation, maps that are not 2-D
            integer maps or whose sizes differ from their prediction's.
    """
    metric = GroupingMetrics(boundary_tolerance)
    metric.update(predictions, references)
    return metric.compute()
