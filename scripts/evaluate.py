"""Evaluate a saved model on a dataset split and write the scores as JSON.

    python scripts/evaluate.py --model outputs/train/model --dataset ~/.cache/native_seg_hf/data/camvid \
        [--split validation] [--out metrics.json]

The model folder holds the model and its image processor (scripts/train.py saves both); the dataset is a Hub id or
a local folder, as for training. Predictions are made at the processor's size and scored at the original image
size: mean IoU, mean and overall accuracy, per-class IoU. Runs under `accelerate launch` too (each process scores
its share; the confusion matrices are summed).
"""

import argparse
import json
from pathlib import Path

from accelerate import PartialState

from native_seg_hf.training.loop import evaluate_saved


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="save_pretrained folder with preprocessor_config.json")
    parser.add_argument("--dataset", required=True, help="Hub dataset id or local folder")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--max_samples", type=int)
    parser.add_argument("--out", type=Path, help="JSON file for the scores (default: print only)")
    args = parser.parse_args()

    scores = evaluate_saved(args.model, args.dataset, args.split, args.image_column, args.label_column,
                            args.max_samples)
    report = {"model": args.model, "dataset": args.dataset, "split": args.split, **scores}
    if PartialState().is_main_process:
        print(f"{args.split}: mIoU {100 * scores['mean_iou']:.2f} on {scores['num_images']} images")
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
