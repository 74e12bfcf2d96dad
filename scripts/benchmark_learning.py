"""Learning-quality benchmark (logic in `native_seg_hf.training.learning`): train models from random initialisation
with one shared recipe and record validation mIoU by step, one JSON per run under results/learning/.

    # runs (skipped where their JSON exists, so a campaign spreads over sittings)
    python scripts/benchmark_learning.py --models senatra senatra-none segformer-b0 --recipe camvid-main --seeds 0 1
    # an ablation variant: config overrides, recorded in the run's name (--override applies to every model)
    python scripts/benchmark_learning.py --models senatra --override '{"grouping_iterations": 2}' --steps 500
    python scripts/benchmark_learning.py --models senatra 'senatra[grouping_iterations=2]' --steps 500  # the same
    # seconds per training step, the models' steps alternated on the same batches in one process
    python scripts/benchmark_learning.py --time --models senatra senatra-none segformer-b0 --recipe camvid-main
    # the README's results table, from the JSON files only
    python scripts/benchmark_learning.py --render

The dataset defaults to the prepared CamVid folder (scripts/prepare_data.py camvid).
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from native_seg_hf.training.learning import (
    MODEL_BUILDERS, RECIPES, RunSpec, file_name, git_commit, hardware, parse_run_name, run_name, time_models,
    train_and_evaluate,
)
from native_seg_hf.training.learning_report import render_readme_table

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = Path.home() / ".cache" / "native_seg_hf" / "data" / "camvid"


def model_variant(name: str) -> str:
    """argparse type of --models: a model, or a variant `model[key=json,...]` (as run names write them)."""
    try:
        parse_run_name(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["senatra", "senatra-none", "segformer-b0"], type=model_variant,
                        help=f"models ({', '.join(sorted(MODEL_BUILDERS))}), or variants model[key=json,...]")
    parser.add_argument("--recipe", default="camvid-main", choices=sorted(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, help="stop after this many steps (default: the recipe's schedule)")
    parser.add_argument("--override", default="{}", help="JSON of config fields for an ablation variant")
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET))
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "learning")
    parser.add_argument("--save_models", type=Path, help="also save each trained model in this folder (one per run)")
    parser.add_argument("--threads", type=int, help="torch threads (one each when two runs share 2 cores)")
    parser.add_argument("--time", action="store_true", help="time alternated training steps instead of training")
    parser.add_argument("--time_steps", type=int, default=6)
    parser.add_argument("--render", action="store_true", help="write the README table from results/learning")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.render:
        render_readme_table(args.results, ROOT / "README.md")
        return
    if not Path(args.dataset).is_dir():
        sys.exit(f"{args.dataset} is not a prepared dataset folder: run `python scripts/prepare_data.py camvid`")
    command = "python " + shlex.join(["scripts/benchmark_learning.py", *sys.argv[1:]])
    overrides = json.loads(args.override)
    variants = [(model, {**variant, **overrides}) for model, variant in map(parse_run_name, args.models)]
    if args.time:
        names = [run_name(model, variant) for model, variant in variants]
        seconds = time_models(names, args.recipe, args.dataset, steps=args.time_steps)
        record = {"recipe": args.recipe, "seconds_per_step": seconds, "steps_timed": args.time_steps,
                  "command": command, "commit": git_commit(), "hardware": hardware()}
        out = args.results / "timing" / file_name(f"{args.recipe}__{'+'.join(names)}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
        print(json.dumps(seconds, indent=1))
        return
    for seed in args.seeds:
        for model, variant in variants:
            spec = RunSpec(model, args.recipe, seed, args.steps, variant)
            if spec.path(args.results).exists():
                print(f"skip {spec.path(args.results).name}: already measured")
                continue
            save_to = args.save_models / spec.path(args.results).stem if args.save_models else None
            train_and_evaluate(spec, args.dataset, args.results, command, save_model=save_to)


if __name__ == "__main__":
    main()
