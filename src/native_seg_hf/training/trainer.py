"""Pieces for fine-tuning semantic models (`SeNaTraForSemanticSegmentation`, `SegmenterForSemanticSegmentation`)
with `transformers.Trainer`. `scripts/train_with_trainer.py` is the whole recipe, runnable (a test runs it); its core:

    from transformers import Trainer, TrainingArguments
    from native_seg_hf.training.data import Augmentation, load_split
    from native_seg_hf.training.trainer import (MeanIoUMetrics, collate_readable, preprocess_logits_for_metrics,
                                                trainer_transform)

    train = load_split(source, "train", ["image", "label"], streaming=False)
    train = train.with_transform(trainer_transform(processor, Augmentation((256, 352))))
    val = load_split(source, "validation", ["image", "label"], streaming=False).with_transform(trainer_transform(processor))
    trainer = Trainer(model, TrainingArguments(..., remove_unused_columns=False, batch_eval_metrics=True),
                      train_dataset=train, eval_dataset=val, processing_class=processor, data_collator=collate_readable,
                      compute_metrics=MeanIoUMetrics(id2label=model.config.id2label),
                      preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    trainer.train(); trainer.evaluate(); trainer.save_model(folder)   # folder: model + processor, pipeline-ready

- `processing_class=processor`: `save_model` then writes the processor next to the model, which
  `pipeline("image-segmentation", model=folder)` needs.
- `MeanIoUMetrics(id2label=...)`: per-class metrics named by class (`eval_iou_sky`), not by index (`eval_iou_0`).
- `remove_unused_columns=False`: the transform needs the raw `image`/`label` columns, which Trainer would drop.
- `preprocess_logits_for_metrics` turns logits into class maps at the label size on the device, so evaluation
  keeps (B, H, W) integer maps instead of (B, C, h, w) float logits; with `batch_eval_metrics=True`,
  `MeanIoUMetrics` folds each batch into a confusion matrix and nothing else is kept.
- Loss under gradient accumulation: the models set `accepts_loss_kwargs = False`, so Trainer divides their mean
  loss by `gradient_accumulation_steps` itself (tests/test_training.py checks the update equals one big batch's).
- Unreadable samples, as in `scripts/train.py`, are skipped and counted: the transform logs each with its id (or
  file) and leaves it empty, `collate_readable` leaves it out of the batch, and `transform.skipped` counts them.
"""

import random

import torch
import torch.nn.functional as F
from transformers import default_data_collator

from ..metrics import MeanIoU
from .data import Augmentation, SampleDecoder, collate


class SegmentationTransform:
    """The `Dataset.with_transform` function `trainer_transform` returns: decodes each sample, then gives
    `pixel_values` and `labels` (augmented crops with an augmentation, else the processor's resize), or None for
    both where the sample cannot be read (logged with its id, or its file when the dataset has no `id_column`;
    counted in `skipped`)."""

    def __init__(self, processor, augmentation: Augmentation | None = None, image_column: str = "image",
                 label_column: str = "label", id_column: str = "id"):
        self.processor, self.augmentation = processor, augmentation
        self.image_column, self.label_column, self.id_column = image_column, label_column, id_column
        self.decoder = SampleDecoder(image_column, label_column, id_column="name", augmentation=augmentation)
        self.rng = random.Random()

    @property
    def skipped(self) -> int:
        """Unreadable samples met so far (each time one is read: Trainer reads a sample once per epoch)."""
        return self.decoder.skipped

    def __call__(self, batch: dict) -> dict:
        images, labels = batch[self.image_column], batch[self.label_column]
        names = batch.get(self.id_column) or [image.get("path") if isinstance(image, dict) else None for image in images]
        samples = [
            self.decoder({self.image_column: image, self.label_column: label, "name": name}, self.rng)
            for image, label, name in zip(images, labels, names)
        ]
        readable = [index for index, sample in enumerate(samples) if sample is not None]
        outputs = {"pixel_values": [None] * len(samples), "labels": [None] * len(samples)}
        if not readable:
            return outputs
        samples = [samples[index] for index in readable]
        if self.augmentation is None:
            inputs = self.processor(images=[s["image"] for s in samples], segmentation_maps=[s["label"] for s in samples],
                                    return_tensors="pt")
        else:
            inputs = collate(samples, self.processor, "labels")
        for position, index in enumerate(readable):
            outputs["pixel_values"][index] = inputs["pixel_values"][position]
            outputs["labels"][index] = inputs["labels"][position]
        return outputs


def trainer_transform(processor, augmentation: Augmentation | None = None, image_column: str = "image",
                      label_column: str = "label", id_column: str = "id") -> SegmentationTransform:
    """A `Dataset.with_transform` function giving `pixel_values` and `labels`: augmented crops with
    `augmentation`, else the processor's resize (evaluation). Use it with `collate_readable`."""
    return SegmentationTransform(processor, augmentation, image_column, label_column, id_column)


def collate_readable(features: list[dict]) -> dict:
    """Trainer's `data_collator` for `trainer_transform` datasets: leaves out the samples the transform could not
    read (already logged and counted), then stacks the rest with `default_data_collator`."""
    readable = [feature for feature in features if feature["pixel_values"] is not None]
    if not readable:
        raise ValueError(f"none of the {len(features)} samples of this batch could be read (see the warnings above)")
    return default_data_collator(readable)


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Class maps at the labels' size from (B, C, h, w) logits (bilinear, then argmax), on the device."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False).argmax(dim=1)


class MeanIoUMetrics:
    """`compute_metrics` for `Trainer(..., batch_eval_metrics=True)`: counts every evaluation batch into a
    confusion matrix and returns mean IoU, accuracies and per-class IoU (`iou_<class>`) at the end. Trainer's
    -100 label padding is ignored.

    Args:
        num_labels: number of classes (default: `len(id2label)`).
        ignore_index: the label that is not scored.
        id2label: class names (`model.config.id2label`), so per-class keys read `iou_sky`; without them they are
            numbered (`iou_0`).
    """

    def __init__(self, num_labels: int | None = None, ignore_index: int = 255, id2label: dict | None = None):
        if num_labels is None and not id2label:
            raise ValueError("MeanIoUMetrics needs num_labels or id2label")
        self.metric = MeanIoU(num_labels or len(id2label), ignore_index=ignore_index)
        self.id2label = id2label or {}

    def __call__(self, eval_pred, compute_result: bool = True) -> dict:
        self.metric.update(eval_pred.predictions, eval_pred.label_ids)
        if not compute_result:
            return {}
        scores = self.metric.compute()
        self.metric.reset()
        results = {key: float(scores[key]) for key in ("mean_iou", "mean_accuracy", "overall_accuracy")}
        for index, iou in enumerate(scores["per_category_iou"]):
            results[f"iou_{self.id2label.get(index, index)}"] = float(iou)
        return results
