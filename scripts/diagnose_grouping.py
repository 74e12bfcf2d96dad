"""What a trained SeNaTra's grouping does, measured (logic in `native_seg_hf.training.diagnosis`).

    python scripts/diagnose_grouping.py MODEL_DIR [MODEL_DIR ...] --out results/diagnosis/NAME.json
    # freshly initialised SeNaTra-Nano models (seed 0), each a name and its config overrides
    python scripts/diagnose_grouping.py --fresh 'as-built={"grouping_parent_bias": 0, "grouping_logit_scale": null}' \
        --fresh 'default={}' --fresh 'none={"grouping_types": ["none", "none", "none"]}' --out results/diagnosis/init.json

For each saved SeNaTraForSemanticSegmentation folder: assignment entropy, largest weights and groups used per
level, at the evaluation size (validation images) and at the training crop size (the recipe's batches); oracle
and model mIoU bounds (soft vs hardened assignments, near label boundaries vs interior); gradient norms per
parameter family on one training batch; where the grouping layers' bias and temperature ended up. Data: CamVid's
validation and training splits (prepared folder).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from native_seg_hf.models.configuration_senatra import SeNaTraConfig
from native_seg_hf.models.modeling_senatra import SeNaTraForSemanticSegmentation
from native_seg_hf.training.diagnosis import assignment_statistics, gradient_statistics, grouping_scalars, label_bounds
from native_seg_hf.training.data import load_id2label
from native_seg_hf.training.learning import RECIPES, BatchSource, eval_inputs, git_commit, hardware, load_samples

DEFAULT_DATASET = Path.home() / ".cache" / "native_seg_hf" / "data" / "camvid"


def fresh_model(overrides: dict, num_labels: int) -> SeNaTraForSemanticSegmentation:
    torch.manual_seed(0)
    return SeNaTraForSemanticSegmentation(SeNaTraConfig.from_preset("nano", num_labels=num_labels, **overrides))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--fresh", action="append", default=[], metavar="NAME=JSON",
                        help="also measure a newly initialised SeNaTra-Nano with these config overrides")
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET))
    parser.add_argument("--recipe", default="camvid-main", choices=sorted(RECIPES))
    parser.add_argument("--images", type=int, default=20, help="validation images for the statistics")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not Path(args.dataset).is_dir():
        sys.exit(f"{args.dataset} is not a prepared dataset folder: run `python scripts/prepare_data.py camvid`")
    recipe = RECIPES[args.recipe]
    val = load_samples(args.dataset, "validation")[: args.images]
    train_batch = BatchSource(load_samples(args.dataset, "train"), recipe, seed=123).batch(0)
    report = {"recipe": args.recipe, "images": len(val), "commit": git_commit(), "hardware": hardware(),
              "command": "python scripts/diagnose_grouping.py " + " ".join(sys.argv[1:]), "models": {}}
    num_labels = len(load_id2label(args.dataset))
    models = [(folder.name, lambda folder=folder: SeNaTraForSemanticSegmentation.from_pretrained(folder))
              for folder in args.models]
    for entry in args.fresh:
        name, overrides = entry.split("=", 1)
        models.append((name, lambda overrides=json.loads(overrides): fresh_model(overrides, num_labels)))
    for name, load in models:
        model = load().eval()
        eval_pixels = torch.cat([eval_inputs(s["image"], recipe.eval_short_side)[0] for s in val])
        entry = {
            "config": {k: getattr(model.config, k) for k in ("grouping_types", "grouping_parent_bias",
                                                              "grouping_logit_scale", "grouping_iterations")},
            "assignments_eval_size": assignment_statistics(model, eval_pixels),
            "assignments_train_size": assignment_statistics(model, train_batch["pixel_values"]),
            "label_bounds": label_bounds(model, val, recipe.eval_short_side, model.config.num_labels),
            "gradients": gradient_statistics(model.train(), train_batch),
            "grouping_scalars": grouping_scalars(model),
        }
        report["models"][name] = entry
        print(f"== {name}")
        for size in ("assignments_eval_size", "assignments_train_size"):
            for level in entry[size]:
                used = level["groups_used_per_image"]
                print(f"  {size[12:]:10s} T{level['transition']} {level['kind']:5s} grid {level['grid']}: entropy "
                      f"{level['mean_entropy']:.2f}/{level['max_entropy']:.2f}, largest weight "
                      f"{level['mean_largest_weight']:.2f} (uniform {level['uniform_weight']:.2f}), groups used "
                      f"{min(used)}-{max(used)} of {level['groups_possible']}")
        print("  mIoU:", ", ".join(f"{k} {v['mean_iou']:.1f}" for k, v in entry["label_bounds"].items()))
        for layer in entry["grouping_scalars"]:
            scale = layer["logit_scale"] and round(layer["logit_scale"], 2)  # None for scaled dot-product logits
            print(f"  stage {layer['stage']} {layer['kind']:5s} logit scale {scale}, parent bias "
                  f"{layer['parent_bias']:.2f}, elsewhere {layer['other_bias_min']:.2f}..{layer['other_bias_max']:.2f}")
        for family, g in entry["gradients"].items():
            print(f"  grad {family:26s} |g| {g['grad_norm']:.2e}  |p| {g['param_norm']:.2e}  rms g {g['grad_per_param_rms']:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
