"""Fine-tune a semantic segmentation model with `transformers.Trainer`: the recipe of the README, runnable.

    python scripts/train_with_trainer.py --dataset ~/.cache/native_seg_hf/data/camvid --output_dir outputs/trainer \
        [--model_name_or_path FOLDER_OR_HUB_ID | --preset nano] [--max_steps 200] [--crop_height 256 --crop_width 352]

It builds SeNaTra with the native semantic head (from a preset, or from a pretrained folder or Hub id with a new head
for the dataset's classes), trains on augmented crops of the `train` split, evaluates mean IoU on `validation`
(per-class keys named by class: `eval_iou_sky`), and saves model and processor to OUTPUT_DIR/model, a folder that
`pipeline("image-segmentation", model=...)` loads; it then segments one validation image with that pipeline to show
it. Unreadable samples are skipped, logged with their id, and counted. For the Accelerate loop (streaming, exact
resume, several processes), use scripts/train.py.
"""

import argparse
import json
from pathlib import Path

from transformers import Trainer, TrainingArguments, pipeline

import native_seg_hf as ns
from native_seg_hf.training.data import DECODE_ERRORS, Augmentation, decode_image, load_id2label, load_split
from native_seg_hf.training.trainer import (
    MeanIoUMetrics,
    collate_readable,
    preprocess_logits_for_metrics,
    trainer_transform,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a prepared folder (scripts/prepare_data.py) or a Hub dataset id")
    parser.add_argument("--output_dir", default="outputs/trainer", help="Trainer's output; the model goes to OUTPUT_DIR/model")
    parser.add_argument("--model_name_or_path", help="start from this SeNaTra folder or Hub id (new head for the classes)")
    parser.add_argument("--preset", default="nano", help="SeNaTra size when training from scratch")
    parser.add_argument("--crop_height", type=int, default=256)
    parser.add_argument("--crop_width", type=int, default=352)
    parser.add_argument("--eval_short_side", type=int, default=256, help="evaluation and inference resize")
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=4e-4)
    args = parser.parse_args()

    id2label = load_id2label(args.dataset)
    labels = {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}
    if args.model_name_or_path:
        # change_head: the checkpoint may hold another task's model; ignore_mismatched_sizes: a head sized for other
        # classes starts anew.
        model = ns.SeNaTraForSemanticSegmentation.from_pretrained(
            args.model_name_or_path, change_head=True, ignore_mismatched_sizes=True, **labels
        )
    else:
        model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig.from_preset(args.preset, **labels))
    processor = ns.SeNaTraImageProcessor.from_model_config(model.config, size={"shortest_edge": args.eval_short_side})

    train_transform = trainer_transform(processor, Augmentation((args.crop_height, args.crop_width)))
    eval_transform = trainer_transform(processor)
    train_set = load_split(args.dataset, "train", ["image", "label"], streaming=False).with_transform(train_transform)
    val_set = load_split(args.dataset, "validation", ["image", "label"], streaming=False)
    training_args = TrainingArguments(
        args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=min(50, args.max_steps // 10),
        lr_scheduler_type="polynomial", weight_decay=0.05, logging_steps=10, save_strategy="no", report_to="none",
        remove_unused_columns=False,  # the transforms read the raw image and label columns
        batch_eval_metrics=True,  # MeanIoUMetrics folds each batch into a confusion matrix
    )
    trainer = Trainer(
        model, training_args, train_dataset=train_set, eval_dataset=val_set.with_transform(eval_transform),
        processing_class=processor,  # save_model writes it next to the model: the pipeline needs it
        data_collator=collate_readable,  # leaves out samples the transform could not read
        compute_metrics=MeanIoUMetrics(id2label=model.config.id2label),  # eval_iou_<class name>
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    metrics["skipped_samples"] = train_transform.skipped + eval_transform.skipped
    folder = Path(args.output_dir) / "model"
    trainer.save_model(str(folder))
    trainer.save_metrics("eval", metrics)
    print(f"validation mIoU {100 * metrics['eval_mean_iou']:.2f}; {metrics['skipped_samples']} unreadable samples "
          f"skipped; model and processor in {folder}")

    segmenter = pipeline("image-segmentation", model=str(folder))
    for record in load_split(args.dataset, "validation", ["image"]):
        try:
            image = decode_image(record["image"]).convert("RGB")
        except DECODE_ERRORS:
            continue  # unreadable (counted above)
        classes = sorted(segment["label"] for segment in segmenter(image))
        print(json.dumps({"pipeline": type(segmenter.model).__name__, "image": record.get("id"), "classes": classes}))
        break


if __name__ == "__main__":
    main()
