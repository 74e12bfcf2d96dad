"""The folder a training run publishes (model, processor, remote code, model card) and its upload.

A run saves `<output_dir>/model`: `save_pretrained` of the model and its image processor (with the package's
modeling files copied next to the weights, so it loads with `trust_remote_code=True` where native_seg_hf is not
installed). `finish_run` adds a README.md rendered from `model_cards/segmentation.md` with the training configuration, the
dataset and its terms, and the measured metrics. `push_folder` uploads it with one `huggingface_hub` call.
"""

import json
from pathlib import Path
from string import Template

from accelerate import PartialState
from huggingface_hub import HfApi

from .prepare import dataset_terms

TEMPLATE = Path(__file__).resolve().parents[3] / "model_cards" / "segmentation.md"


def _score(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def render_model_card(model, metrics: dict, training_args: dict, run: dict, repo_id: str,
                      template: Path = TEMPLATE) -> str:
    """The model card text: `template` with the run's numbers filled in."""
    id2label = model.config.id2label
    per_class = metrics.get("per_category_iou") or []
    dataset = training_args["dataset"]
    return Template(template.read_text()).substitute(
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        model_class=type(model).__name__,
        model_type=model.config.model_type,
        parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        dataset=dataset,
        dataset_terms=dataset_terms(dataset) or "see the dataset's own card",
        task=training_args["task"],
        eval_split=training_args["eval_split"],
        steps=run["steps"],
        num_images=metrics.get("num_images", 0),
        mean_iou=_score(metrics.get("mean_iou")),
        mean_accuracy=_score(metrics.get("mean_accuracy")),
        overall_accuracy=_score(metrics.get("overall_accuracy")),
        per_class_rows="\n".join(f"| {id2label.get(i, i)} | {_score(v)} |" for i, v in enumerate(per_class)),
        training_args=json.dumps(training_args, indent=2),
        transformers_version=run["transformers_version"],
        num_processes=run["num_processes"],
        steps_per_second=f"{run['steps_per_second']:.3f}",
    )


def push_folder(folder: Path, repo_id: str) -> str:
    """Create the model repo if needed and upload the folder; returns the commit URL."""
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload from native_seg_hf").commit_url


def finish_run(result: dict, args) -> None:
    """After `train`: write the model card into the saved model folder and, with `push_to_hub`, upload it."""
    if not PartialState().is_main_process:
        return
    folder = Path(args.output_dir) / "model"
    run = json.loads((Path(args.output_dir) / "all_results.json").read_text())
    repo_id = args.hub_model_id or folder.resolve().parent.name
    card = render_model_card(result["model"], result["metrics"], run["training_args"], run, repo_id)
    (folder / "README.md").write_text(card)
    if args.push_to_hub:
        if not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        print(f"pushed to {push_folder(folder, args.hub_model_id)}")
