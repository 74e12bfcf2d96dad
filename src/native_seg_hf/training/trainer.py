"""Pieces for fine-tuning semantic models (`SeNaTraForSemanticSegmentation`, `SegmenterForSemanticSegmentation`)
with `transformers.Trainer`:

    train = load_split(source, "train", ["image", "label"], streaming=False)
    train = train.with_transform(trainer_transform(processor, Augmentation((256, 352))))
    val = load_split(source, "validation", ["image", "label"], streaming=False).with_transform(trainer_transform(processor))
    trainer = Trainer(model, TrainingArguments(..., remove_unused_columns=False, batch_eval_metrics=True),
                      train_dataset=train, eval_dataset=val, data_collator=default_data_collator,
                      compute_metrics=MeanIoUMetrics(model.config.num_labels),
                      preprocess_logits_for_metrics=preprocess_logits_for_metrics)

- `remove_unused_columns=False`: the transform needs the raw `image`/`label` columns, which Trainer would drop.
- `preprocess_logits_for_metrics` turns logits into class maps at the label size on the device, so evaluation
  keeps (B, H, W) integer maps instead of (B, C, h, w) float logits; with `batch_eval_metrics=True`,
  `MeanIoUMetrics` folds each batch into a confusion matrix and nothing else is kept.
- Loss under gradient accumulation: the models set `accepts_loss_kwargs = False`, so Trainer divides their mean
  loss by `gradient_accumulation_steps` itself (tests/test_training.py checks the update equals one big batch's).
- Trainer reads every sample, so an unreadable one raises here; `scripts/train.py` skips and counts them instead.
"""

import random

import torch
import torch.nn.functional as F

from ..metrics import MeanIoU
from .data import Augmentation, SampleDecoder, collate


def trainer_transform(processor, augmentation: Augmentation | None = None, image_column: str = "image",
                      label_column: str = "label"):
    """A `Dataset.with_transform` function giving `pixel_values` and `labels`: augmented crops with
    `augmentation`, else the processor's resize (evaluation)."""
    decoder = SampleDecoder(image_column, label_column, augmentation=augmentation)
    rng = random.Random()

    def transform(batch: dict) -> dict:
        samples = []
        for image, label in zip(batch[image_column], batch[label_column]):
            sample = decoder({image_column: image, label_column: label}, rng)
            if sample is None:
                raise ValueError("unreadable sample in a Trainer dataset (scripts/train.py skips these)")
            samples.append(sample)
        if augmentation is None:
            images, labels = [s["image"] for s in samples], [s["label"] for s in samples]
            inputs = processor(images=images, segmentation_maps=labels, return_tensors="pt")
        else:
            inputs = collate(samples, processor, "labels")
        return {"pixel_values": list(inputs["pixel_values"]), "labels": list(inputs["labels"])}

    return transform


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Class maps at the labels' size from (B, C, h, w) logits (bilinear, then argmax), on the device."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False).argmax(dim=1)


class MeanIoUMetrics:
    """`compute_metrics` for `Trainer(..., batch_eval_metrics=True)`: counts every evaluation batch into a
    confusion matrix and returns mean IoU, accuracies and per-class IoU (`iou_<class>`) at the end. Trainer's
    -100 label padding is ignored."""

    def __init__(self, num_labels: int, ignore_index: int = 255, id2label: dict | None = None):
        self.metric = MeanIoU(num_labels, ignore_index=ignore_index)
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
