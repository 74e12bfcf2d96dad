"""The folder a training run publishes (model, processor, remote code, model card) and its upload.

A run saves `<output_dir>/model`: `save_pretrained` of the model and its image processor (with the package's
modeling files copied next to the weights, so it loads with `trust_remote_code=True` where native_seg_hf is not
installed). `finish_run` adds a README.md rendered from `model_cards/segmentation.md` (package data) with the
training configuration, the dataset with its terms and license, and the measured metrics. `push_folder` uploads it
with one `huggingface_hub` call.
"""

import json
from pathlib import Path
from string import Template

from accelerate import PartialState
from huggingface_hub import EvalResult, HfApi, ModelCardData
from huggingface_hub.repocard import metadata_load

from .prepare import dataset_license, dataset_terms

# Package data (pyproject.toml), so the card is there after a regular `pip install`, not only in a clone.
TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "segmentation.md"


def _score(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def is_local(source) -> bool:
    """Whether a dataset or model source is a local folder rather than a Hub id."""
    return source is not None and Path(source).exists()


def dataset_name(source: str) -> str:
    """How a card names a dataset: its Hub id, or a local folder's `pretty_name` (prepare_data.py writes one) or
    folder name; a local path means nothing to the card's readers."""
    if not is_local(source):
        return source
    readme = Path(source) / "README.md"
    metadata = (metadata_load(readme) or {}) if readme.is_file() else {}
    return metadata.get("pretty_name") or Path(source).resolve().name


def card_metadata(model, metrics: dict, training_args: dict, model_name: str) -> str:
    """The card's YAML header, every field from the run: license of the data the weights were trained on (`unknown`
    when the source does not say), `datasets` and `base_model` only where they are Hub ids, and the measured mean
    IoU (percent) as a model-index result."""
    dataset, start = training_args["dataset"], training_args.get("model_name_or_path")
    name = dataset_name(dataset)
    results = None
    if metrics.get("mean_iou") is not None:
        results = [EvalResult(
            task_type="image-segmentation", dataset_type=name, dataset_name=name,
            dataset_split=training_args["eval_split"], metric_type="mean_iou", metric_name="mean IoU",
            metric_value=round(100 * metrics["mean_iou"], 2),
        )]
    data = ModelCardData(
        license=dataset_license(dataset) or "unknown",
        library_name="transformers", pipeline_tag="image-segmentation",
        tags=["image-segmentation", "native_seg_hf", model.config.model_type],
        datasets=None if is_local(dataset) else [dataset],
        base_model=start if start and not is_local(start) else None,
        metrics=["mean_iou"], model_name=model_name, eval_results=results,
    )
    return data.to_yaml()


def render_model_card(model, metrics: dict, training_args: dict, run: dict, model_id: str,
                      model_name: str | None = None, template: Path = TEMPLATE) -> str:
    """The model card text: `template` with the run's numbers filled in. `model_id` is what the card's usage
    example loads: the Hub id the folder is pushed to, or the local folder; `model_name` (the title) defaults to
    its last part."""
    id2label = model.config.id2label
    per_class = metrics.get("per_category_iou") or []
    dataset = training_args["dataset"]
    model_name = model_name or model_id.rstrip("/").split("/")[-1]
    return Template(template.read_text()).substitute(
        metadata=card_metadata(model, metrics, training_args, model_name),
        model_name=model_name,
        model_id=model_id,
        model_class=type(model).__name__,
        parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        dataset=dataset_name(dataset),
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
    # Not pushed: the usage example loads the folder itself (a made-up Hub id would not load).
    model_id = args.hub_model_id or str(folder.resolve())
    model_name = args.hub_model_id.split("/")[-1] if args.hub_model_id else folder.resolve().parent.name
    card = render_model_card(result["model"], result["metrics"], run["training_args"], run, model_id, model_name)
    (folder / "README.md").write_text(card)
    if args.push_to_hub:
        if not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        print(f"pushed to {push_folder(folder, args.hub_model_id)}")
