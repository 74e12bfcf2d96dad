"""Panoptic quality (PQ, SQ, RQ; Kirillov et al., CVPR 2019) with the COCO rules of panopticapi's `pq_compute`.

Inputs, per image, for the prediction and for the reference: a map of segment ids and its `segments_info`,
a list of {"id", "category_id"} entries, plus "iscrowd" on the reference side (the entries of the COCO
panoptic JSON; Transformers' `post_process_panoptic_segmentation` calls the category "label_id": rename it).
Once for all images: the categories, COCO-style {"id", "isthing"} entries (`panoptic_coco_categories.json`).

Rules, as panopticapi's `pq_compute_single_core` applies them:

- A pixel whose id is not listed in its image's `segments_info` is void: COCO's id 0, post-processing's -1.
  Segment areas are counted in the maps (panopticapi reads the reference areas from the JSON, which equal
  them for COCO).
- A predicted and a reference segment of the same category match when IoU > 0.5, where the union leaves
  out the pixels of the predicted segment that are void in the reference. IoU > 0.5 makes matches unique.
- A reference segment with iscrowd = 1 is never matched and never a false negative; every other unmatched
  reference segment is a false negative, also where the prediction is void there.
- An unmatched predicted segment is a false positive unless more than half of its pixels are void in the
  reference or lie on crowd segments of its own category. (panopticapi keeps one crowd region per category
  and image, which is all COCO has; here every crowd segment of the category counts.)

Counts pool over all images; then per category, with IoU summed over the matches (true positives, TP):

    PQ = sum IoU / (TP + FP/2 + FN/2)    SQ = sum IoU / TP (0 without TP)    RQ = TP / (TP + FP/2 + FN/2)

so PQ = SQ x RQ. The overall, things (isthing = 1) and stuff scores are plain means over the categories that
occur (TP + FP + FN > 0); a category that never occurs is nan in the per-category arrays and left out. Scores
are fractions (panopticapi prints them x 100).

torchmetrics' `PanopticQuality` has no crowd, and where the prediction is void it also leaves those pixels
out of the union and skips a reference segment that is mostly void in the prediction; without void
predictions and crowd segments the two agree (the tests check it on real COCO annotations).
"""

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ._inputs import as_map, check_same_shape, paired

MATCH_IOU = 0.5  # COCO's threshold; above 0.5 no segment can match two others
IGNORED_FRACTION = 0.5  # an unmatched prediction mostly on void or same-category crowd is no false positive


def segment_entries(segments_info: Iterable[Mapping], what: str) -> list[dict]:
    """One image's `segments_info` as {"id", "category_id", "iscrowd"} entries (iscrowd 0 where it is
    missing; other keys, such as COCO's "area" and "bbox", dropped)."""
    entries = []
    for segment in segments_info:
        if "id" not in segment or "category_id" not in segment:
            raise ValueError(
                f"{what}: segments_info entries need 'id' and 'category_id' (post-processing calls the "
                f"category 'label_id': rename it), got {dict(segment)}"
            )
        iscrowd = int(segment.get("iscrowd") or 0)
        entries.append({"id": int(segment["id"]), "category_id": int(segment["category_id"]), "iscrowd": iscrowd})
    return entries


class PanopticQuality:
    """Per-category counts behind `panoptic_quality`: `update()` them image batch by image batch, then
    `compute()`. With several processes, sum `true_positives`, `false_positives`, `false_negatives` and
    `iou_sum` over them before `compute()`.

    Args:
        categories: COCO-style category entries with "id" and "isthing" (other keys are ignored).
    """

    def __init__(self, categories: Iterable[Mapping]):
        categories = list(categories)
        if not categories:
            raise ValueError("panoptic_quality: no categories were given")
        missing = [category for category in categories if "id" not in category or "isthing" not in category]
        if missing:
            raise ValueError(f"panoptic_quality: categories need 'id' and 'isthing', got {missing[0]}")
        self.category_ids = np.array([category["id"] for category in categories], dtype=np.int64)
        if len(set(self.category_ids.tolist())) != len(categories):
            raise ValueError("panoptic_quality: category ids are not unique")
        self.isthing = np.array([bool(category["isthing"]) for category in categories])
        self._position = {category_id: index for index, category_id in enumerate(self.category_ids.tolist())}
        self.reset()

    def reset(self) -> None:
        num_categories = len(self.category_ids)
        self.true_positives = np.zeros(num_categories, dtype=np.int64)
        self.false_positives = np.zeros(num_categories, dtype=np.int64)
        self.false_negatives = np.zeros(num_categories, dtype=np.int64)
        self.iou_sum = np.zeros(num_categories, dtype=np.float64)
        self.num_images = 0

    def update(
        self,
        predictions,
        references,
        prediction_segments_info: Sequence[Sequence[Mapping]],
        reference_segments_info: Sequence[Sequence[Mapping]],
    ) -> None:
        """Count a batch of images: four equally long per-image sequences (the maps' sizes may differ
        between images)."""
        pairs = paired("panoptic_quality", predictions, references)
        prediction_segments_info, reference_segments_info = (
            list(prediction_segments_info),
            list(reference_segments_info),
        )
        for role, infos in (("prediction", prediction_segments_info), ("reference", reference_segments_info)):
            if len(infos) != len(pairs):
                raise ValueError(f"panoptic_quality: {len(pairs)} images but {len(infos)} {role} segments_info lists")
        for index, ((prediction, reference), prediction_info, reference_info) in enumerate(
            zip(pairs, prediction_segments_info, reference_segments_info)
        ):
            self._count_image(
                prediction, reference, prediction_info, reference_info, f"panoptic_quality: image {index}"
            )

    def _segments(self, id_map, segments_info: Sequence[Mapping], what: str):
        """(index map, category position per segment, crowd flag per segment) of one image: the index map
        numbers the listed segments 0..n-1 in `segments_info` order and gives void pixels n."""
        id_map = as_map(id_map, what)
        segments_info = segment_entries(segments_info, what)
        for segment in segments_info:
            if segment["category_id"] not in self._position:
                raise ValueError(
                    f"{what}: segment {segment['id']} has category {segment['category_id']}, not one of the categories"
                )
        ids = [segment["id"] for segment in segments_info]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{what}: segments_info lists a segment id twice")
        values, inverse = np.unique(id_map, return_inverse=True)
        absent = set(ids) - set(values.tolist())
        if absent:
            raise ValueError(
                f"{what}: segments {sorted(absent)} are listed in segments_info but have no pixel in the map"
            )
        position = {segment_id: index for index, segment_id in enumerate(ids)}
        void = len(ids)
        index_map = np.array([position.get(value, void) for value in values.tolist()])[inverse.reshape(id_map.shape)]
        categories = np.array([self._position[segment["category_id"]] for segment in segments_info], dtype=np.int64)
        crowd = np.array([segment["iscrowd"] == 1 for segment in segments_info], dtype=bool)
        return index_map, categories, crowd

    def _count_image(self, prediction, reference, prediction_info, reference_info, what: str) -> None:
        predicted, predicted_category, _ = self._segments(prediction, prediction_info, f"{what}: prediction")
        actual, actual_category, crowd = self._segments(reference, reference_info, f"{what}: reference")
        check_same_shape(predicted.shape, actual.shape, what)
        num_predicted, num_actual = len(predicted_category), len(actual_category)
        # overlap[r, p]: pixels of reference segment r in predicted segment p; the last row and column are void
        overlap = np.bincount(
            (actual * (num_predicted + 1) + predicted).ravel(), minlength=(num_actual + 1) * (num_predicted + 1)
        ).reshape(num_actual + 1, num_predicted + 1)
        intersection = overlap[:-1, :-1]
        actual_area = overlap[:-1].sum(axis=1)
        predicted_area = overlap[:, :-1].sum(axis=0)
        predicted_on_void = overlap[-1, :-1]
        union = actual_area[:, None] + predicted_area[None, :] - intersection - predicted_on_void[None, :]
        iou = intersection / union  # every listed segment has pixels, so union > 0
        same_category = actual_category[:, None] == predicted_category[None, :]
        matched = (iou > MATCH_IOU) & same_category & ~crowd[:, None]

        num_categories = len(self.category_ids)
        actual_index, predicted_index = np.nonzero(matched)
        matched_category = actual_category[actual_index]
        self.true_positives += np.bincount(matched_category, minlength=num_categories)
        self.iou_sum += np.bincount(
            matched_category, weights=iou[actual_index, predicted_index], minlength=num_categories
        )
        missed = ~matched.any(axis=1) & ~crowd
        self.false_negatives += np.bincount(actual_category[missed], minlength=num_categories)
        on_same_category_crowd = (intersection * (same_category & crowd[:, None])).sum(axis=0)
        ignored = (predicted_on_void + on_same_category_crowd) / predicted_area > IGNORED_FRACTION
        spurious = ~matched.any(axis=0) & ~ignored
        self.false_positives += np.bincount(predicted_category[spurious], minlength=num_categories)
        self.num_images += 1

    def compute(self) -> dict:
        """The scores of everything counted since the last `reset()` (rules in the module docstring)."""
        if self.num_images == 0:
            raise ValueError("panoptic_quality: nothing to compute, update() was never called")
        true_positives = self.true_positives.astype(np.float64)
        denominator = true_positives + 0.5 * self.false_positives + 0.5 * self.false_negatives
        occurs = denominator > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            per_category = {
                "pq": np.where(occurs, self.iou_sum / denominator, np.nan),
                "sq": np.where(occurs, np.where(true_positives > 0, self.iou_sum / true_positives, 0.0), np.nan),
                "rq": np.where(occurs, true_positives / denominator, np.nan),
            }
        scores = {}
        for suffix, group in (("", np.ones_like(occurs)), ("_things", self.isthing), ("_stuff", ~self.isthing)):
            counted = occurs & group
            for name, values in per_category.items():
                scores[name + suffix] = values[counted].mean() if counted.any() else np.nan
            scores["num_categories" + suffix] = int(counted.sum())
        scores["category_ids"] = self.category_ids.copy()
        scores.update({f"per_category_{name}": values for name, values in per_category.items()})
        return scores


def panoptic_quality(
    predictions,
    references,
    prediction_segments_info: Sequence[Sequence[Mapping]],
    reference_segments_info: Sequence[Sequence[Mapping]],
    categories: Iterable[Mapping],
) -> dict:
    """Panoptic quality of predicted against reference panoptic segmentations, with COCO's rules.

    Args:
        predictions: per image an (H, W) map of predicted segment ids (sizes may differ between images).
        references: per image the reference segment-id map, of the prediction's size.
        prediction_segments_info: per image a list of {"id", "category_id"}, one per predicted segment.
        reference_segments_info: per image a list of {"id", "category_id", "iscrowd" (optional, default 0)}.
        categories: {"id", "isthing"} per category (COCO's `panoptic_coco_categories.json`).
        Pixels whose id is not listed are void.

    Returns:
        `pq`, `sq`, `rq` and `num_categories` (categories that occur), the same with the suffixes `_things`
        and `_stuff` (nan where no category of the group occurs), `category_ids`, and `per_category_pq`,
        `per_category_sq`, `per_category_rq` aligned with it (nan for categories that never occur). Scores are
        fractions; the rules are in `native_seg_hf.metrics.panoptic`.

    Raises:
        ValueError: no images, unequal counts or shapes, segments_info entries without "id"/"category_id",
            unknown categories, ids listed twice or listed without a pixel.
    """
    metric = PanopticQuality(categories)
    metric.update(predictions, references, prediction_segments_info, reference_segments_info)
    return metric.compute()
