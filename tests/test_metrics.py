"""Metrics: hand-computed cases, cross-checks against independent implementations on real labels (torchmetrics
for mean IoU and panoptic quality, plain loops for the grouping metrics), bad input, and the `evaluate`
modules loaded offline by path."""

import inspect
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from native_seg_hf.metrics import (
    METRIC_NAMES,
    GroupingMetrics,
    MeanIoU,
    achievable_segmentation_accuracy,
    boundary_recall,
    grouping_metrics,
    load_metric,
    mean_iou,
    panoptic_quality,
    undersegmentation_error,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CAMVID = SHARED_DATA / "camvid" / "val"
BSDS = SHARED_DATA / "bsds500" / "val"
COCO = SHARED_DATA / "coco_panoptic_sample"
CAMVID_CLASSES, CAMVID_VOID = 11, 11


def needs(path: Path):
    return pytest.mark.skipif(
        not path.is_dir(), reason=f"{path} is absent (the shared data folder holds the real labels)"
    )


@pytest.fixture
def no_network(monkeypatch):
    """The evaluate modules must load and run without the Hub: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading or running an evaluate module")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def assert_scores_equal(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-12, err_msg=key)


def load_offline(name: str):
    """The evaluate module, checked to run from evaluate's copy of the script in its module cache."""
    metric = load_metric(name, keep_in_memory=True)
    script = Path(inspect.getfile(type(metric)))
    assert script.name == f"{name}.py" and "native_seg_hf" not in script.parts
    return metric


# ---------------------------------------------------------------- mean IoU


def test_mean_iou_hand_computed_with_ignore_and_trainer_padding():
    # scored pixels (reference, prediction): (0, 0) (0, 1) (1, 1) (1, 1); 255 and -100 are not scored, so
    # class 2, predicted only there, is absent
    reference = np.array([[0, 0, 1], [1, 255, -100]])
    prediction = np.array([[0, 1, 1], [1, 2, 0]])
    scores = mean_iou([prediction], [reference], num_labels=3, ignore_index=255)
    np.testing.assert_allclose(scores["per_category_iou"], [1 / 2, 2 / 3, np.nan])
    np.testing.assert_allclose(scores["per_category_accuracy"], [1 / 2, 1, np.nan])
    assert scores["mean_iou"] == pytest.approx(7 / 12)
    assert scores["mean_accuracy"] == pytest.approx(3 / 4)
    assert scores["overall_accuracy"] == pytest.approx(3 / 4)
    assert mean_iou([prediction], [reference], 3, nan_to_num=-1.0)["per_category_iou"][2] == -1.0
    # pixels pool over images of different sizes: the same pixels split into a 1x3 and a 1x1 map
    split = mean_iou([prediction[0], prediction[1, :1]], [reference[0], reference[1, :1]], num_labels=3)
    assert_scores_equal(split, scores)


def test_mean_iou_label_map_and_reduce_labels():
    # reduce_labels: 0 is ignored, 1 -> 0, 2 -> 1, and 255 stays ignored
    reduced = mean_iou([np.array([[1, 0, 1, 0]])], [np.array([[0, 1, 2, 255]])], num_labels=2, reduce_labels=True)
    np.testing.assert_allclose(reduced["per_category_iou"], [1, 1])
    prediction = np.array([[0, 1, 1, 0]])
    # label_map acts first and all at once: 5 -> 0 and 0 -> 255 (ignored), not 5 -> 0 -> 255
    mapped = mean_iou([prediction], [np.array([[5, 1, 0, 1]])], num_labels=2, label_map={5: 0, 0: 255})
    np.testing.assert_allclose(mapped["per_category_iou"], [1 / 2, 1 / 2])
    assert mapped["overall_accuracy"] == pytest.approx(2 / 3)


def camvid_val_pairs(count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Real CamVid labels (void -> 255) and predictions that are wrong on a random 30% of pixels and confuse
    pavement with road in a band, so the classes' IoUs differ."""
    paths = sorted((CAMVID / "labels").glob("*.png"))[:count]
    references = [np.array(Image.open(path)).astype(np.int64) for path in paths]
    rng = np.random.default_rng(0)
    predictions = []
    for reference in references:
        prediction = np.where(
            rng.random(reference.shape) < 0.3, rng.integers(0, CAMVID_CLASSES, reference.shape), reference
        )
        band = prediction[200:260]
        band[band == 4] = 3
        predictions.append(np.where(prediction == CAMVID_VOID, 0, prediction))
    return predictions, [np.where(reference == CAMVID_VOID, 255, reference) for reference in references]


@needs(CAMVID)
def test_mean_iou_matches_torchmetrics_on_camvid_with_trainer_padding():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex, MulticlassRecall

    predictions, references = camvid_val_pairs(6)
    options = dict(num_classes=CAMVID_CLASSES, ignore_index=255, validate_args=False)
    torchmetrics_scores = {
        "per_category_iou": MulticlassJaccardIndex(average="none", **options),
        "per_category_accuracy": MulticlassRecall(average="none", **options),
        "overall_accuracy": MulticlassAccuracy(average="micro", **options),
    }
    for reference_metric in torchmetrics_scores.values():
        for prediction, reference in zip(predictions, references):
            reference_metric.update(torch.from_numpy(prediction), torch.from_numpy(reference))
    expected = {
        key: reference_metric.compute().double().numpy() for key, reference_metric in torchmetrics_scores.items()
    }

    scores = mean_iou(predictions, references, num_labels=CAMVID_CLASSES, ignore_index=255)
    for key, value in expected.items():
        np.testing.assert_allclose(scores[key], value, rtol=1e-6, err_msg=key)
    # every class occurs, so the means are torchmetrics' macro averages
    np.testing.assert_allclose(scores["mean_iou"], expected["per_category_iou"].mean(), rtol=1e-6)
    np.testing.assert_allclose(scores["mean_accuracy"], expected["per_category_accuracy"].mean(), rtol=1e-6)
    assert 0.3 < scores["mean_iou"] < 0.9 and scores["per_category_iou"][4] < scores["per_category_iou"][3]

    # Trainer-style batches: maps padded with -100 to a common size, predictions too, counted on tensors
    metric = MeanIoU(CAMVID_CLASSES)
    for start in range(0, len(predictions), 4):
        padded = [
            (
                np.pad(prediction, ((0, 8), (0, 16)), constant_values=-100),
                np.pad(reference, ((0, 8), (0, 16)), constant_values=-100),
            )
            for prediction, reference in zip(predictions[start : start + 4], references[start : start + 4])
        ]
        metric.update(*(torch.from_numpy(np.stack(maps)) for maps in zip(*padded)))
    assert_scores_equal(metric.compute(), scores)


@needs(CAMVID)
def test_mean_iou_evaluate_module_by_path_matches_function_on_maps_of_varying_size(no_network):
    predictions, references = camvid_val_pairs(3)
    # int64 maps cropped to three sizes, with Trainer's padding value in one
    predictions = [prediction[: 360 - 40 * i, : 480 - 50 * i] for i, prediction in enumerate(predictions)]
    references = [reference[: 360 - 40 * i, : 480 - 50 * i].copy() for i, reference in enumerate(references)]
    references[0][:5] = -100
    metric = load_offline("mean_iou")
    for prediction, reference in zip(predictions, references):
        metric.add(prediction=prediction, reference=reference)
    scores = metric.compute(num_labels=CAMVID_CLASSES, ignore_index=255)
    assert_scores_equal(scores, mean_iou(predictions, references, num_labels=CAMVID_CLASSES, ignore_index=255))
    with pytest.raises(
        ValueError, match=r"mean_iou: image 1: predictions must be a non-empty 2-D \(height, width\) map"
    ):
        metric.compute(
            predictions=[predictions[0], predictions[1][None]], references=references[:2], num_labels=CAMVID_CLASSES
        )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mean_iou([], [], 3), "no predictions and no references"),
        (lambda: mean_iou([np.zeros((2, 2), int)] * 2, [np.zeros((2, 2), int)], 3), "2 predictions but 1 references"),
        (
            lambda: mean_iou([np.zeros((2, 2), int)], [np.zeros((2, 3), int)], 3),
            r"image 0: the prediction has shape \(2, 2\)",
        ),
        (lambda: mean_iou([np.zeros((2, 2))], [np.zeros((2, 2), int)], 3), "image 0: prediction must hold integer"),
        (
            lambda: mean_iou([np.zeros((1, 2), int)], [np.array([[0, 3]])], 3),
            r"reference labels .* \[0, 3\), got values from 0 to 3",
        ),
        (lambda: mean_iou([np.array([[0, 7]])], [np.zeros((1, 2), int)], 3), "prediction labels"),
        (lambda: MeanIoU(3).compute(), "update\\(\\) was never called"),
        (lambda: MeanIoU(0), "num_labels must be at least 1"),
    ],
)
def test_mean_iou_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_mean_iou_prediction_outside_range_is_fine_where_the_reference_is_ignored():
    # Trainer pads predictions with -100 exactly where it pads the labels
    scores = mean_iou([np.array([[1, -100]])], [np.array([[1, -100]])], num_labels=2)
    assert scores["overall_accuracy"] == 1.0


# ---------------------------------------------------------------- panoptic quality

PERSON, CAR, SKY, ROAD, TREE = 1, 2, 3, 4, 5
TINY_CATEGORIES = [
    {"id": PERSON, "isthing": 1},
    {"id": CAR, "isthing": 1},
    {"id": SKY, "isthing": 0},
    {"id": ROAD, "isthing": 0},
    {"id": TREE, "isthing": 0},  # never occurs
]
# reference: person 10, car crowd 20, sky 30, road 40, void 0
TINY_REFERENCE = np.array(
    [
        [10, 10, 10, 30, 30, 30],
        [10, 10, 10, 30, 30, 30],
        [20, 20, 0, 0, 40, 40],
        [20, 20, 0, 0, 40, 40],
    ]
)
TINY_PREDICTION = np.array(
    [
        [1, 1, 1, 1, 3, 3],
        [1, 1, 1, 1, 3, 3],
        [2, 2, 5, 4, 4, 4],
        [2, 2, 5, 4, 4, 4],
    ]
)


def tiny_reference_info(car_is_crowd: bool):
    return [
        {"id": 10, "category_id": PERSON},
        {"id": 20, "category_id": CAR, "iscrowd": int(car_is_crowd)},
        {"id": 30, "category_id": SKY, "iscrowd": 0},
        {"id": 40, "category_id": ROAD},
    ]


def tiny_prediction_info(segment_2_category: int):
    categories = {1: PERSON, 2: segment_2_category, 3: SKY, 4: ROAD, 5: PERSON}
    return [{"id": segment_id, "category_id": category} for segment_id, category in categories.items()]


def test_panoptic_quality_hand_computed_void_and_crowd():
    # person 1 vs 10: 6 shared, union 8 + 6 - 6 = 8 -> IoU 0.75; sky 3 vs 30: 4 / 6; road 4 covers 40 and 2
    # void pixels, which leave the union: 4 / (6 + 4 - 4 - 2) = 1. Predicted car 2 lies on the car crowd and
    # person 5 on void: neither is a false positive.
    scores = panoptic_quality(
        [TINY_PREDICTION], [TINY_REFERENCE], [tiny_prediction_info(CAR)], [tiny_reference_info(True)], TINY_CATEGORIES
    )
    np.testing.assert_allclose(scores["per_category_pq"], [0.75, np.nan, 2 / 3, 1, np.nan])
    np.testing.assert_allclose(scores["per_category_rq"], [1, np.nan, 1, 1, np.nan])
    assert scores["pq"] == pytest.approx((0.75 + 2 / 3 + 1) / 3) and scores["num_categories"] == 3
    assert scores["pq_things"] == pytest.approx(0.75) and scores["num_categories_things"] == 1
    assert scores["pq_stuff"] == pytest.approx((2 / 3 + 1) / 2) and scores["num_categories_stuff"] == 2
    np.testing.assert_array_equal(scores["category_ids"], [1, 2, 3, 4, 5])

    # Transformers' convention (ids from 0, -1 = no segment) and an unlisted id both read as void
    hf_prediction = np.where(TINY_PREDICTION == 5, -1, TINY_PREDICTION - 1)
    hf_info = [{"id": entry["id"] - 1, "category_id": entry["category_id"]} for entry in tiny_prediction_info(CAR)[:4]]
    hf_scores = panoptic_quality(
        [hf_prediction], [TINY_REFERENCE], [hf_info], [tiny_reference_info(True)], TINY_CATEGORIES
    )
    assert_scores_equal(hf_scores, scores)


def test_panoptic_quality_hand_computed_false_positive_and_negative():
    # a predicted person on the car region: no same-category crowd there, so a false positive (the person
    # 0.75 match stays); the car, not crowd now, is missed: a false negative
    scores = panoptic_quality(
        [TINY_PREDICTION],
        [TINY_REFERENCE],
        [tiny_prediction_info(PERSON)],
        [tiny_reference_info(False)],
        TINY_CATEGORIES,
    )
    np.testing.assert_allclose(scores["per_category_pq"], [0.75 / 1.5, 0, 2 / 3, 1, np.nan])
    np.testing.assert_allclose(scores["per_category_sq"], [0.75, 0, 2 / 3, 1, np.nan])
    np.testing.assert_allclose(scores["per_category_rq"], [1 / 1.5, 0, 1, 1, np.nan])
    assert scores["pq"] == pytest.approx((0.5 + 0 + 2 / 3 + 1) / 4)
    assert scores["sq"] == pytest.approx((0.75 + 0 + 2 / 3 + 1) / 4)
    assert scores["rq"] == pytest.approx((2 / 3 + 0 + 1 + 1) / 4)
    assert scores["pq_things"] == pytest.approx(0.25)


def load_coco_sample():
    """The two real COCO val2017 panoptic annotations: id maps (id = R + 256 G + 256^2 B), segments_info,
    categories."""
    sample = COCO / "sample_data"
    annotations = json.loads((sample / "panoptic_examples.json").read_text())["annotations"]
    maps = []
    for annotation in annotations:
        rgb = np.array(Image.open(sample / "panoptic_examples" / annotation["file_name"])).astype(np.int32)
        maps.append(rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2])
    categories = json.loads((COCO / "panoptic_coco_categories.json").read_text())
    return maps, [annotation["segments_info"] for annotation in annotations], categories


def perturbed_panoptic_prediction(reference, segments_info, categories, seed):
    """A prediction from a reference: void and crowd filled from the nearest segment (torchmetrics and
    panopticapi differ on void predictions), shifted a few pixels, the largest thing split in two, one
    thing given another thing category, and a square of a stuff category the image does not have."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    kept = {entry["id"] for entry in segments_info if not entry["iscrowd"]}
    unassigned = ~np.isin(reference, list(kept))
    _, (rows, columns) = ndimage.distance_transform_edt(unassigned, return_indices=True)
    prediction = np.roll(reference[rows, columns], shift=(3, -4), axis=(0, 1))
    info = [{"id": entry["id"], "category_id": entry["category_id"]} for entry in segments_info if entry["id"] in kept]

    isthing = {category["id"]: category["isthing"] for category in categories}
    things = [entry for entry in info if isthing[entry["category_id"]]]
    largest = max(things, key=lambda entry: (prediction == entry["id"]).sum())
    rows_of_largest = np.nonzero((prediction == largest["id"]).any(axis=1))[0]
    lower_half = (prediction == largest["id"]) & (np.arange(prediction.shape[0])[:, None] > np.median(rows_of_largest))
    prediction[lower_half] = split_id = max(kept) + 1
    info.append({"id": split_id, "category_id": largest["category_id"]})

    relabelled = things[rng.integers(len(things))]
    other_things = [c["id"] for c in categories if c["isthing"] and c["id"] != relabelled["category_id"]]
    relabelled["category_id"] = int(rng.choice(other_things))

    present = {entry["category_id"] for entry in info}
    extra_stuff = next(c["id"] for c in categories if not c["isthing"] and c["id"] not in present)
    prediction[:40, :40] = extra_id = split_id + 1
    info.append({"id": extra_id, "category_id": extra_stuff})
    return prediction, [entry for entry in info if (prediction == entry["id"]).any()]


@needs(COCO)
def test_panoptic_quality_matches_torchmetrics_on_coco_sample():
    from torchmetrics.detection import PanopticQuality as TorchmetricsPanopticQuality

    references, reference_info, categories = load_coco_sample()
    # torchmetrics has no crowd: make the crowd segments void (unlisted) for this comparison
    reference_info = [[entry for entry in info if not entry["iscrowd"]] for info in reference_info]
    predictions, prediction_info = zip(
        *(
            perturbed_panoptic_prediction(r, i, categories, seed)
            for seed, (r, i) in enumerate(zip(references, reference_info))
        )
    )
    scores = panoptic_quality(predictions, references, prediction_info, reference_info, categories)

    things = [c["id"] for c in categories if c["isthing"]]
    stuffs = [c["id"] for c in categories if not c["isthing"]]
    reference_metric = TorchmetricsPanopticQuality(things, stuffs, return_sq_and_rq=True, return_per_class=True)

    def category_instance(id_map, info):
        # torchmetrics' input: per pixel (category, instance); unlisted (void) pixels get category 0, unknown
        category_of = {entry["id"]: entry["category_id"] for entry in info}
        segment_ids, position = np.unique(id_map, return_inverse=True)
        category = np.array([category_of.get(segment, 0) for segment in segment_ids.tolist()])[
            position.reshape(id_map.shape)
        ]
        return torch.from_numpy(np.stack([category, id_map], axis=-1)[None]).long()

    for prediction, reference, p_info, r_info in zip(predictions, references, prediction_info, reference_info):
        reference_metric.update(category_instance(prediction, p_info), category_instance(reference, r_info))
    per_class = reference_metric.compute().double().numpy()  # (categories, [pq, sq, rq]), things then stuff, by id
    order = sorted(things) + sorted(stuffs)
    counts = reference_metric.true_positives + reference_metric.false_positives + reference_metric.false_negatives
    occurs = {category_id: bool(count) for category_id, count in zip(order, counts)}
    for column, name in enumerate(("pq", "sq", "rq")):
        theirs = dict(zip(order, per_class[:, column]))
        for suffix, ids in (("", order), ("_things", things), ("_stuff", stuffs)):
            expected = np.mean([theirs[i] for i in ids if occurs[i]])
            # torchmetrics divides in float32
            assert scores[name + suffix] == pytest.approx(expected, rel=1e-6), name + suffix
        ours = dict(zip(scores["category_ids"].tolist(), scores[f"per_category_{name}"]))
        for category_id in order:
            if occurs[category_id]:
                assert ours[category_id] == pytest.approx(theirs[category_id], rel=1e-6)
            else:
                assert np.isnan(ours[category_id])
    # the perturbations leave a real mix of matches, misses and spurious segments
    assert 0.4 < scores["pq"] < 0.95 and 0 < scores["rq_things"] < 1 and 0 < scores["rq_stuff"] < 1
    assert scores["num_categories"] > scores["num_categories_things"] > 0


@needs(COCO)
def test_panoptic_quality_evaluate_module_by_path_with_coco_entries(no_network):
    references, reference_info, categories = load_coco_sample()
    predictions, prediction_info = zip(
        *(
            perturbed_panoptic_prediction(r, i, categories, seed)
            for seed, (r, i) in enumerate(zip(references, reference_info))
        )
    )
    expected = panoptic_quality(predictions, references, prediction_info, reference_info, categories)
    # the real crowd segments change the result: the module must keep "iscrowd" while dropping "area"/"bbox"
    without_crowd = [[entry for entry in info if not entry["iscrowd"]] for info in reference_info]
    assert expected["pq"] != panoptic_quality(predictions, references, prediction_info, without_crowd, categories)["pq"]
    metric = load_offline("panoptic_quality")
    scores = metric.compute(
        predictions=predictions,
        references=references,
        prediction_segments_info=prediction_info,
        reference_segments_info=reference_info,  # COCO entries with "area", "bbox", "iscrowd"
        categories=categories,
    )
    assert_scores_equal(scores, expected)


def tiny_panoptic_call(**changes):
    arguments = dict(
        predictions=[TINY_PREDICTION],
        references=[TINY_REFERENCE],
        prediction_segments_info=[tiny_prediction_info(CAR)],
        reference_segments_info=[tiny_reference_info(True)],
        categories=TINY_CATEGORIES,
    )
    arguments.update(changes)
    return lambda: panoptic_quality(**arguments)


@pytest.mark.parametrize(
    "call, message",
    [
        (tiny_panoptic_call(predictions=[], references=[]), "no predictions and no references"),
        (tiny_panoptic_call(reference_segments_info=[]), "1 images but 0 reference segments_info"),
        (tiny_panoptic_call(references=[TINY_REFERENCE[:, :5]]), r"image 0: the prediction has shape \(4, 6\)"),
        (tiny_panoptic_call(prediction_segments_info=[[{"id": 1, "label_id": PERSON}]]), "rename it"),
        (tiny_panoptic_call(prediction_segments_info=[[{"id": 1, "category_id": 99}]]), "category 99, not one of"),
        (tiny_panoptic_call(prediction_segments_info=[tiny_prediction_info(CAR) * 2]), "lists a segment id twice"),
        (tiny_panoptic_call(prediction_segments_info=[[{"id": 8, "category_id": SKY}]]), r"segments \[8\] are listed"),
        (tiny_panoptic_call(categories=[]), "no categories"),
        (tiny_panoptic_call(categories=[{"id": 1}]), "need 'id' and 'isthing'"),
    ],
)
def test_panoptic_quality_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- grouping metrics


def test_grouping_metrics_hand_computed():
    truth = np.repeat([[0, 0, 1, 1]], 4, axis=0)  # left | right halves
    segments = np.repeat([[7, 7, 7, 9]], 4, axis=0)  # a 12-pixel segment over the contour, a 4-pixel one
    assert achievable_segmentation_accuracy(segments, truth) == 12 / 16  # 8 + 4 of 16 pixels
    assert undersegmentation_error(segments, truth) == 8 / 16  # min(8, 4) + min(4, 8) + min(4, 0)
    # the truth's contour pixels are columns 1 and 2, the prediction's 2 and 3
    assert boundary_recall(segments, truth, tolerance=0) == 0.5
    assert boundary_recall(segments, truth, tolerance=1) == 1.0
    assert np.isnan(boundary_recall(segments, np.zeros_like(truth)))
    # two human segmentations: averaged per image, the boundary-less one left out of the recall
    scores = grouping_metrics([segments], [[truth, np.zeros_like(truth)]], boundary_tolerance=0)
    assert scores == {
        "achievable_segmentation_accuracy": (0.75 + 1) / 2,
        "boundary_recall": 0.5,
        "undersegmentation_error": (0.5 + 0) / 2,
        "mean_num_segments": 2.0,
    }


def load_bsds(count: int, stride: int = 4):
    """Real BSDS500 validation images and all their human segmentations, subsampled by `stride`."""
    images, truths = [], []
    for path in sorted((BSDS / "groundTruth").glob("*.mat"))[:count]:
        ground_truth = scipy.io.loadmat(path)["groundTruth"]
        truths.append(
            [ground_truth[0, k]["Segmentation"][0, 0][::stride, ::stride] for k in range(ground_truth.shape[1])]
        )
        images.append(np.array(Image.open(BSDS / "images" / f"{path.stem}.jpg"))[::stride, ::stride])
    return images, truths


def slic_like(image: np.ndarray, num_seeds: int, iterations: int = 5) -> np.ndarray:
    """Superpixels as SLIC makes them, without its search window: k-means on colour and position from a grid
    of seeds."""
    height, width, _ = image.shape
    step = np.sqrt(height * width / num_seeds)
    rows, columns = np.mgrid[0:height, 0:width]
    features = np.concatenate([image.reshape(-1, 3) / 10.0, np.stack([rows.ravel(), columns.ravel()], 1) / step * 4], 1)
    seed_rows, seed_columns = np.mgrid[step / 2 : height : step, step / 2 : width : step]
    seeds = (seed_rows.astype(int).ravel() * width + seed_columns.astype(int).ravel()).clip(0, height * width - 1)
    centres = features[seeds]
    for _ in range(iterations):
        labels = ((features[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        counts = np.bincount(labels, minlength=len(centres))[:, None]
        sums = np.stack([np.bincount(labels, weights=f, minlength=len(centres)) for f in features.T], 1)
        centres = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
    return labels.reshape(height, width)


def loop_asa(segments, truth):
    total = 0
    for s in np.unique(segments):
        inside = truth[segments == s]
        total += max((inside == g).sum() for g in np.unique(inside))
    return total / segments.size


def loop_undersegmentation_error(segments, truth):
    total = 0
    for g in np.unique(truth):
        for s in np.unique(segments):
            shared = ((segments == s) & (truth == g)).sum()
            if shared:
                total += min(shared, (segments == s).sum() - shared)
    return total / segments.size


def loop_boundary(labels):
    height, width = labels.shape
    boundary = np.zeros((height, width), dtype=bool)
    for y in range(height):
        for x in range(width):
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                if 0 <= y + dy < height and 0 <= x + dx < width and labels[y + dy, x + dx] != labels[y, x]:
                    boundary[y, x] = True
    return boundary


def loop_boundary_recall(segments, truth, tolerance):
    predicted, expected = loop_boundary(segments), loop_boundary(truth)
    found = [
        predicted[max(0, y - tolerance) : y + tolerance + 1, max(0, x - tolerance) : x + tolerance + 1].any()
        for y, x in zip(*np.nonzero(expected))
    ]
    return np.mean(found) if found else np.nan


@needs(BSDS)
def test_grouping_metrics_match_loops_on_bsds500():
    images, truths = load_bsds(3)
    predictions = [slic_like(images[0], 60), slic_like(images[1], 120)]
    height, width = truths[2][0].shape
    predictions.append((np.arange(height)[:, None] // 9) * 100 + np.arange(width)[None, :] // 9)  # a grid
    for tolerance in (0, 2):
        expected_per_image = []
        for segments, image_truths in zip(predictions, truths):
            per_truth = [
                (
                    loop_asa(segments, t),
                    loop_boundary_recall(segments, t, tolerance),
                    loop_undersegmentation_error(segments, t),
                )
                for t in image_truths
            ]
            for t, (asa, recall, error) in zip(image_truths, per_truth):
                assert achievable_segmentation_accuracy(segments, t) == pytest.approx(asa, abs=1e-12)
                assert boundary_recall(segments, t, tolerance) == pytest.approx(recall, abs=1e-12)
                assert undersegmentation_error(segments, t) == pytest.approx(error, abs=1e-12)
            expected_per_image.append(np.mean(per_truth, axis=0))
        scores = grouping_metrics(predictions, truths, boundary_tolerance=tolerance)
        expected = np.mean(expected_per_image, axis=0)
        assert scores["achievable_segmentation_accuracy"] == pytest.approx(expected[0], abs=1e-12)
        assert scores["boundary_recall"] == pytest.approx(expected[1], abs=1e-12)
        assert scores["undersegmentation_error"] == pytest.approx(expected[2], abs=1e-12)
    # real, informative values: far from the trivial 0 and 1
    assert 0.7 < scores["achievable_segmentation_accuracy"] < 0.99 and 0.3 < scores["boundary_recall"] < 0.99
    assert 0.02 < scores["undersegmentation_error"] < 0.5


@needs(BSDS)
def test_grouping_metrics_evaluate_module_by_path_and_batches(no_network):
    images, truths = load_bsds(2, stride=2)
    predictions = [
        slic_like(image[::2, ::2], 80).repeat(2, 0).repeat(2, 1)[: t[0].shape[0], : t[0].shape[1]]
        for image, t in zip(images, truths)
    ]
    expected = grouping_metrics(predictions, [np.stack(t) for t in truths])  # (K, H, W) stacks
    metric = load_offline("grouping_metrics")
    scores = metric.compute(predictions=predictions, references=truths)
    assert scores == pytest.approx(expected, abs=1e-12)
    accumulated = GroupingMetrics()
    for prediction, truth in zip(predictions, truths):
        accumulated.update([prediction], [truth])
    assert accumulated.compute() == pytest.approx(expected, abs=1e-12)


GRID = np.arange(12).reshape(3, 4)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: grouping_metrics([], []), "no predictions and no references"),
        (lambda: grouping_metrics([GRID], [GRID, GRID]), "1 predictions but 2 references"),
        (lambda: grouping_metrics([GRID], [[]]), "image 0: no human segmentation"),
        (
            lambda: grouping_metrics([GRID], [[GRID, GRID[:, :3]]]),
            r"image 0, human segmentation 1: the prediction has shape \(3, 4\)",
        ),
        (
            lambda: grouping_metrics([GRID[None]], [GRID]),
            r"image 0: prediction must be a non-empty 2-D \(height, width\) map",
        ),
        (lambda: grouping_metrics([GRID], [GRID], boundary_tolerance=-1), "tolerance must be >= 0"),
        (lambda: boundary_recall(GRID, GRID.T), r"boundary_recall: the prediction has shape \(3, 4\)"),
        (lambda: GroupingMetrics().compute(), "update\\(\\) was never called"),
    ],
)
def test_grouping_metrics_reject_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_load_metric_names():
    assert METRIC_NAMES == ("mean_iou", "panoptic_quality", "grouping_metrics")
    with pytest.raises(ValueError, match="unknown metric 'miou'; the metrics are mean_iou, panoptic_quality"):
        load_metric("miou")
