"""The Accelerate training loop behind `scripts/train.py`, and the evaluation behind `scripts/evaluate.py`.

One process per device (`accelerate launch`), each reading its own part of a `datasets` stream (see `data.py` for
why the data loader is not passed through `accelerator.prepare`). Per optimizer step: `gradient_accumulation_steps`
micro-batches under `accelerator.accumulate`, gradient clipping, AdamW with layer-wise lr decay and EoMT's
schedule (`optim.py`), mask annealing for query models. Losses are normalised over the whole step's batch on every
process (`train_step`), so W processes compute the update of one process on the global batch.

Every `save_steps` a checkpoint folder `<output_dir>/checkpoints/step_<N>` gets `accelerator.save_state` (model,
optimizer, scheduler, RNGs) plus `stream_<rank>.json` (each process's position in its stream) and
`trainer_state.json` (the step, the number of processes, the planned `max_steps`), written atomically: into a
temporary folder renamed to `step_<N>` once complete, so a run killed at any point leaves only complete
checkpoints under that name. `resume_from_checkpoint="latest"` continues from the newest complete one with the
same samples in the same order.
"""

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, EomtConfig, EomtForUniversalSegmentation

from ..metrics import MeanIoU
from ..models.configuration_segmenter import SegmenterConfig
from ..models.configuration_senatra import SeNaTraConfig
from ..models.image_processing_senatra import SeNaTraImageProcessor
from ..models.modeling_segmenter import SegmenterForSemanticSegmentation
from ..models.modeling_senatra import (
    SeNaTraForSemanticSegmentation,
    SeNaTraForUniversalSegmentation,
    SeNaTraHungarianMatcher,
    SeNaTraPreTrainedModel,
    global_num_masks,
)
from .data import (
    Augmentation, SampleDecoder, TrainStream, batches, class_weights, collate, decode_image, eval_samples,
    load_id2label, load_split,
)
from .mask_annealing import set_mask_annealing
from .optim import RunLength, create_optimizer, create_scheduler

logger = logging.getLogger(__name__)

MODELS = {
    "senatra": SeNaTraForSemanticSegmentation,
    "senatra-universal": SeNaTraForUniversalSegmentation,
    "segmenter": SegmenterForSemanticSegmentation,
    "eomt": EomtForUniversalSegmentation,
}
QUERY_MODELS = ("senatra-universal", "eomt")
CLASS_WEIGHT_SAMPLES = 2000  # label maps read for --class_weighting (the whole split of most datasets)


@dataclass
class TrainArguments:
    """Everything a run depends on; `scripts/train.py` parses it from the command line and the model card records
    it."""

    dataset: str = field(metadata={"help": "a Hub dataset id (online) or a local folder, e.g. one prepare_data.py wrote"})
    output_dir: str = field(default="outputs/train", metadata={"help": "checkpoints, final model, metrics"})
    model: str = field(default="senatra", metadata={"help": f"model to train: {', '.join(MODELS)}"})
    task: str = field(default="semantic", metadata={"help": "semantic, instance or panoptic (the last two for query models)"})
    preset: str = field(default="nano", metadata={"help": "SeNaTra size (of the model, or of Segmenter's backbone)"})
    config: str | None = field(default=None, metadata={"help": "a config.json to build the model from instead of --preset"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "start from this pretrained folder or Hub id"})
    change_head: bool = field(default=False, metadata={"help": "with --model_name_or_path, a SeNaTra checkpoint saved "
                                                                "as another task model: keep its backbone, start a "
                                                                "new head (e.g. senatra-universal from a semantic "
                                                                "model)"})
    train_split: str = "train"
    eval_split: str = "validation"
    image_column: str = "image"
    label_column: str = field(default="label", metadata={"help": "class-id maps (255 = unlabelled)"})
    instance_column: str | None = field(default=None, metadata={"help": "instance-id maps, for instance/panoptic tasks"})
    id_column: str | None = field(default="id", metadata={"help": "sample names, for logs (none: set it empty)"})
    # One help text serves --streaming and --no_streaming (HfArgumentParser), so it says what both do.
    streaming: bool = field(default=True, metadata={"help": "whether to stream the training split (default: yes, an "
                                                             "IterableDataset with a shuffle buffer, split between "
                                                             "processes by node); --no_streaming loads it in memory"})
    shuffle_buffer: int = 256
    # Workers decode in parallel with the training step; one core stays with the step itself.
    num_workers: int = field(default=min(4, max(0, (os.cpu_count() or 1) - 1)), metadata={
        "help": "data loader worker processes that decode and augment the training stream (default: the CPU cores "
                "but one, at most 4; 0: in the training process). A resumed run needs the same number"})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch intra-op threads of each training process while it trains (default: OMP_NUM_THREADS when "
                "set, else this process's share of the cores less one per data loader worker, at least 1; see "
                "training_threads)"})
    crop_height: int = 256
    crop_width: int = 352
    base_short_side: int | None = field(default=None, metadata={"help": "short side before random scaling "
                                                                        "(default: the image's own)"})
    scale_min: float = 0.5
    scale_max: float = 2.0
    jitter: bool = field(default=True, metadata={"help": "whether to apply photometric jitter (default: yes; "
                                                         "--no_jitter turns it off)"})
    eval_short_side: int | None = field(default=None, metadata={"help": "evaluation resize (default: crop_height)"})
    max_eval_samples: int | None = None
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps (with --max_train_minutes: at most)"})
    max_train_minutes: float | None = field(default=None, metadata={
        "help": "time budget: train as many steps as fit in this many minutes at the pace of the run so far (every "
                "pause counted), re-planned after every step; the lr schedule and mask annealing end with the run "
                "(optim.RunLength). Evaluation and saving come after"})
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = field(default=1.0, metadata={"help": "layer-wise lr decay (EoMT 0.8 when fine-tuning; 1 "
                                                              "from scratch)"})
    warmup_steps: int = 0
    backbone_warmup_steps: int = field(default=0, metadata={"help": "> 0: EoMT's two-stage warm-up (backbone "
                                                                    "frozen during --warmup_steps)"})
    poly_power: float = 0.9
    max_grad_norm: float = 1.0
    class_weighting: str | None = field(default=None, metadata={
        "help": "weigh the semantic loss per class from the training labels (the first "
                f"{CLASS_WEIGHT_SAMPLES} samples): 'enet' = 1/ln(1.02 + class share) (default: no weighting); "
                "saved as the config's semantic_loss_weights"})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16 (where the hardware has it)"})
    seed: int = 0
    logging_steps: int = 10
    eval_steps: int = 0
    save_steps: int = 0
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "resume a run: 'latest' or a "
                                                                               "checkpoint folder"})
    checkpoints_total_limit: int | None = 2
    push_to_hub: bool = field(default=False, metadata={"help": "push_to_hub: publish model, processor, remote code "
                                                               "and model card"})
    hub_model_id: str | None = None
    sample_log: bool = field(default=False, metadata={"help": "record each step's sample ids in "
                                                              "samples_<rank>.jsonl"})


def training_threads(num_workers: int, requested: int | None = None) -> int:
    """Torch intra-op threads for one training process whose stream runs `num_workers` data loader workers.

    `requested` when given, else `OMP_NUM_THREADS` when set (as `accelerate launch` and `torchrun` set it for
    several processes per machine), else the cores this process may run on (its CPU affinity) divided between the
    training processes of this machine (`LOCAL_WORLD_SIZE`), less one core per worker, and at least 1. Each worker
    decodes on a core of its own (PyTorch runs workers with one thread); with torch's default, one thread per core,
    the step's threads and the workers would outnumber the cores, and every parallel operation of the step would
    wait at its barrier for a thread the OS had set aside for a worker: the step slows down several times instead
    of overlapping with decoding.
    """
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, cores // processes - num_workers)


def build_model(args: TrainArguments, id2label: dict[int, str]):
    """The model to train: from `model_name_or_path`, from `config`, or from a SeNaTra preset."""
    if args.model not in MODELS:
        raise ValueError(f"--model must be one of {list(MODELS)}, got {args.model!r}")
    if args.task != "semantic" and args.model not in QUERY_MODELS:
        raise ValueError(f"task {args.task!r} needs a query model ({', '.join(QUERY_MODELS)}), not {args.model}")
    model_class = MODELS[args.model]
    labels = {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}
    if args.change_head and not (args.model_name_or_path and issubclass(model_class, SeNaTraPreTrainedModel)):
        raise ValueError("--change_head applies to --model_name_or_path with a SeNaTra model (senatra, "
                         "senatra-universal)")
    if args.model_name_or_path:
        # ignore_mismatched_sizes: a head for another label set starts afresh instead of failing to load
        extra = {"change_head": True} if args.change_head else {}
        model = model_class.from_pretrained(args.model_name_or_path, ignore_mismatched_sizes=True, **labels, **extra)
        return with_our_loss_rules(model)
    if args.config:
        config = AutoConfig.from_pretrained(args.config, **labels)
    elif args.model == "segmenter":
        config = SegmenterConfig(backbone_config=SeNaTraConfig.from_preset(args.preset), **labels)
    elif args.model == "eomt":
        # EoMT takes square inputs of one size: crops (and evaluation images) are padded to it.
        config = EomtConfig(image_size=max(args.crop_height, args.crop_width), **labels)
    else:
        config = SeNaTraConfig.from_preset(args.preset, **labels)
    return with_our_loss_rules(model_class(config))


def with_our_loss_rules(model):
    """Give Transformers' EoMT loss the fixes of our universal model's (`SeNaTraLoss`): the number of masks as the
    mean over processes (Transformers divides by the number of processes twice, making the mask losses W times too
    large on W processes) and the float32 matcher with finite costs. Other models are returned as they are."""
    if isinstance(model, EomtForUniversalSegmentation):
        config = model.config
        model.criterion.get_num_masks = global_num_masks
        model.criterion.matcher = SeNaTraHungarianMatcher(
            cost_class=config.class_weight, cost_mask=config.mask_weight, cost_dice=config.dice_weight,
            num_points=config.train_num_points,
        )
    return model


def check_crop_fits(model, args: TrainArguments) -> None:
    """EoMT takes inputs of one fixed size (`image_size`): a larger crop would fail at the first batch, so say so
    before training starts."""
    if isinstance(model.config, EomtConfig):
        size = model.config.image_size
        if max(args.crop_height, args.crop_width) > size:
            raise ValueError(
                f"this EoMT model takes {size}x{size} inputs (config.image_size) and crops of {args.crop_height}x"
                f"{args.crop_width} do not fit: pass --crop_height and --crop_width of at most {size}"
            )


def image_processor(model, args: TrainArguments) -> SeNaTraImageProcessor:
    """The processor saved with the model: resizes the short side to the evaluation size (EoMT: the long side,
    padded to its fixed input size)."""
    side = args.eval_short_side or args.crop_height
    if isinstance(model.config, EomtConfig):
        size = model.config.image_size
        return SeNaTraImageProcessor.from_model_config(
            model.config, size={"longest_edge": size}, pad_size={"height": size, "width": size}
        )
    return SeNaTraImageProcessor.from_model_config(model.config, size={"shortest_edge": side})


def training_class_weights(args: TrainArguments, num_labels: int) -> list[float]:
    """`args.class_weighting`'s weights from the label maps of the training split's first CLASS_WEIGHT_SAMPLES
    samples (a stream is read only that far)."""
    if args.model in QUERY_MODELS:
        raise ValueError(f"--class_weighting applies to semantic models, not {args.model} (a query model's loss "
                         "weighs masks)")
    records = load_split(args.dataset, args.train_split, [args.label_column], streaming=True).take(CLASS_WEIGHT_SAMPLES)
    labels = (np.asarray(decode_image(record[args.label_column])) for record in records)
    return class_weights(labels, num_labels, args.class_weighting)


def labelled_weight(samples: list[dict], ignore_index: int, weights: list[float] | None) -> float:
    """The labelled pixels of `samples`, each counted with its class's weight when the loss weighs classes."""
    if weights is None:
        return float(sum((sample["label"] != ignore_index).sum() for sample in samples))
    weights = np.asarray(weights)
    return float(sum(weights[sample["label"][sample["label"] != ignore_index]].sum() for sample in samples))


def targets_for(args: TrainArguments) -> str:
    if args.model not in QUERY_MODELS:
        return "labels"
    return "class_masks" if args.task == "semantic" else "instance_masks"


def to_device(batch: dict, device) -> dict:
    """The batch on `device`; to a GPU through pinned memory, so that the copy does not wait for the CPU."""
    device = torch.device(device)

    def move(tensor):
        if device.type == "cuda":
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor.to(device)

    return {key: [move(item) for item in value] if isinstance(value, list) else move(value)
            for key, value in batch.items()}


@torch.no_grad()
def evaluate_model(model, processor, samples, num_labels: int, accelerator: Accelerator, batch_size: int = 4,
                   ignore_index: int = 255) -> dict:
    """Mean IoU of `model` over `samples` (decoded, unaugmented; this process's share), at the original image size:
    the processor resizes and pads, the model predicts, post-processing maps back, and the confusion matrices of
    every process are summed."""
    was_training = model.training
    model.eval()
    metric = MeanIoU(num_labels, ignore_index=ignore_index)
    count = 0
    for batch in batches(samples, batch_size):
        images = [sample["image"] for sample in batch]
        inputs = processor(images=images, return_tensors="pt").to(accelerator.device)
        outputs = model(pixel_values=inputs["pixel_values"])
        sizes = [(image.height, image.width) for image in images]
        predictions = processor.post_process_semantic_segmentation(outputs, sizes)
        metric.update(predictions, [torch.from_numpy(sample["label"].astype("int64")) for sample in batch])
        count += len(batch)
    counts = metric.confusion_matrix if count else np.zeros((num_labels, num_labels), dtype=np.int64)
    metric.confusion_matrix = accelerator.reduce(torch.from_numpy(counts).to(accelerator.device), "sum").cpu().numpy()
    scores = metric.compute()
    model.train(was_training)
    return {
        "mean_iou": float(scores["mean_iou"]), "mean_accuracy": float(scores["mean_accuracy"]),
        "overall_accuracy": float(scores["overall_accuracy"]),
        "per_category_iou": [None if math.isnan(v) else float(v) for v in scores["per_category_iou"]],
        "num_images": int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum")),
    }


def load_trained_model(folder):
    """A saved model as the class its config names (ours or Transformers'), in eval mode. Not an Auto class: one
    config type serves several of our models (semantic and universal SeNaTra)."""
    import native_seg_hf

    architectures = AutoConfig.from_pretrained(folder).architectures
    if not architectures:
        raise ValueError(f"{folder}/config.json names no architecture; save the model with save_pretrained")
    model_class = getattr(native_seg_hf, architectures[0], None) or getattr(transformers, architectures[0])
    return model_class.from_pretrained(folder).eval()


def evaluate_saved(folder, dataset: str, split: str = "validation", image_column: str = "image",
                   label_column: str = "label", max_samples: int | None = None, batch_size: int = 4) -> dict:
    """Mean IoU of a saved model folder (model + processor) on a dataset split, in this process or under
    `accelerate launch`."""
    accelerator = Accelerator()
    model = accelerator.prepare(load_trained_model(folder))
    processor = AutoImageProcessor.from_pretrained(folder)
    samples = eval_samples(load_split(dataset, split, [image_column, label_column]),
                           SampleDecoder(image_column, label_column), accelerator.process_index,
                           accelerator.num_processes, max_samples)
    return evaluate_model(model, processor, samples, model.config.num_labels, accelerator, batch_size,
                          processor.ignore_index)


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """The `step_<N>` folders under `output_dir/checkpoints`, oldest first (complete or not)."""
    folders = [p for p in (output_dir / "checkpoints").glob("step_*") if p.name[len("step_"):].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[len("step_"):]))


def checkpoint_state(folder: Path) -> dict | None:
    """A checkpoint's `trainer_state.json` if the checkpoint is complete (that file, written last, and the stream
    position of every process that wrote it), else None."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    # Checkpoints written before the number of processes was recorded hold one stream file per process.
    processes = state.setdefault("num_processes", len(list(folder.glob("stream_*.json"))))
    complete = processes > 0 and all((folder / f"stream_{rank}.json").is_file() for rank in range(processes))
    return state if complete else None


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a run killed while writing them) are skipped with a warning."""
    for folder in reversed(checkpoint_folders(output_dir)):
        if checkpoint_state(folder) is not None:
            return folder
        logger.warning("skipping the incomplete checkpoint %s (its run was killed while writing it)", folder)
    return None


def save_checkpoint(accelerator: Accelerator, stream: TrainStream, output_dir: Path, step: int,
                    limit: int | None, max_steps: int | None = None, train_seconds: float | None = None) -> Path:
    """Write checkpoint `step_<step>` atomically and keep the newest `limit` complete ones.

    Every process writes into a temporary folder `.tmp_step_<step>`; once all have, the main process adds
    `trainer_state.json` and renames the folder to `step_<step>` in one step. A kill at any moment leaves either
    the previous checkpoints untouched or the new one complete (a leftover temporary folder is never read, and is
    cleared by the next save of that step). Checkpoints past the limit are renamed `.old_step_<N>` before they are
    deleted, so a kill in the middle of a deletion leaves no half-deleted `step_<N>`, which would look incomplete
    and never be pruned; leftover `.old_` folders are cleared by the next save."""
    checkpoints = output_dir / "checkpoints"
    folder, temporary = checkpoints / f"step_{step}", checkpoints / f".tmp_step_{step}"
    if accelerator.is_main_process:
        for leftover in [temporary, *checkpoints.glob(".old_step_*")]:
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    (temporary / f"stream_{accelerator.process_index}.json").write_text(json.dumps(stream.state_dict()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "num_processes": accelerator.num_processes, "max_steps": max_steps,
                 "train_seconds": train_seconds}
        (temporary / "trainer_state.json").write_text(json.dumps(state))
        replaced = checkpoints / f".old_step_{step}"
        if folder.exists():  # an incomplete folder of an older run, or a step redone after resuming further back
            shutil.rmtree(replaced, ignore_errors=True)
            folder.rename(replaced)
        temporary.rename(folder)
        shutil.rmtree(replaced, ignore_errors=True)
        complete = [f for f in checkpoint_folders(output_dir) if checkpoint_state(f) is not None]
        for stale in complete[:-limit] if limit else []:
            trash = checkpoints / f".old_{stale.name}"
            stale.rename(trash)
            shutil.rmtree(trash)
    accelerator.wait_for_everyone()
    return folder


def resume(accelerator: Accelerator, stream: TrainStream, output_dir: Path, checkpoint: str) -> dict:
    """Load a checkpoint (or the latest complete one) into the run; returns its `trainer_state.json` ({"step": 0}
    when 'latest' finds none)."""
    folder = latest_checkpoint(output_dir) if checkpoint == "latest" else Path(checkpoint)
    if folder is None:
        logger.warning("no checkpoint in %s: starting from scratch", output_dir / "checkpoints")
        return {"step": 0}
    state = checkpoint_state(folder)
    if state is None:
        raise ValueError(f"{folder} is not a complete checkpoint (no trainer_state.json or a process's "
                         "stream_<rank>.json): its run was killed while writing it; resume from an older one or "
                         "pass 'latest'")
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(
            f"{folder} was written by {state['num_processes']} processes and this run has "
            f"{accelerator.num_processes}: every process continues its own part of the training stream, so resume "
            f"with {state['num_processes']} processes (accelerate launch --num_processes {state['num_processes']})"
        )
    accelerator.load_state(str(folder))
    stream.load_state_dict(json.loads((folder / f"stream_{accelerator.process_index}.json").read_text()))
    accelerator.print(f"resumed from {folder} (step {state['step']})")
    return state


def restart_schedule(optimizer, scheduler, state: dict, max_steps: int, accelerator: Accelerator) -> None:
    """After resuming, set every group's lr from the schedule built for this run's `max_steps`.

    The optimizer state restores the lr that the checkpoint's own schedule reached (0 at its last step when the
    checkpoint ended its run), and that lr would drive the next step; the schedule's functions are not saved, so
    from then on this run's apply. Recomputing now makes a resumed run with a larger `max_steps` follow the new
    schedule from its first step, and says so."""
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    planned = state.get("max_steps")
    if planned is not None and planned != max_steps:
        accelerator.print(f"the checkpoint's schedule ran to {planned} steps; it now runs to --max_steps "
                          f"{max_steps} (lr {lrs[-1]:.2e} at step {state['step']})")


def train_step(model, step_samples: list[list[dict]], processor, accelerator: Accelerator, targets: str) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches (this process's share of the step).

    Returns the step's loss as this process contributes it (the mean over processes is the loss of the whole step's
    batch) and the number of micro-batches with no labelled pixel.

    - Semantic models return the mean over a micro-batch's labelled pixels (weighted by class with
      `semantic_loss_weights`). Each is weighted by the micro-batch's share of the labelled pixels (their total
      weight) of the whole step, over every process and micro-batch: after Accelerate's division by the
      accumulation steps and DDP's averaging over processes, the gradient is that of the mean over every labelled
      pixel of the step, as on one process (plain averaging would give a pixel of a half-ignored image twice the
      weight of one in a fully labelled image).
    - Query models normalise their mask losses by the number of masks over every process themselves
      (`global_num_masks`).
    - A micro-batch with no labelled pixel contributes a zero loss that keeps the graph (every parameter gets a
      zero gradient, as DDP needs), not a NaN.
    """
    ignore_index = processor.ignore_index
    weights = getattr(accelerator.unwrap_model(model).config, "semantic_loss_weights", None)
    counts = [labelled_weight(samples, ignore_index, weights) for samples in step_samples]
    if targets == "labels":
        total = accelerator.reduce(torch.tensor(sum(counts), device=accelerator.device), "sum").item()
        scale = len(step_samples) * accelerator.num_processes / max(total, 1)
    step_loss, unlabelled = 0.0, 0
    for samples, count in zip(step_samples, counts):
        batch = to_device(collate(samples, processor, targets), accelerator.device)
        with accelerator.accumulate(model):
            if count == 0:  # still a forward, which DDP expects before every backward
                unlabelled += 1
                model(pixel_values=batch["pixel_values"])
                loss = sum(parameter.sum() for parameter in model.parameters() if parameter.requires_grad) * 0.0
            else:
                loss = model(**batch).loss
                if targets == "labels":
                    loss = loss * (count * scale)
            accelerator.backward(loss)
        step_loss += loss.item() / len(step_samples)
    return step_loss, unlabelled


def replan(length: RunLength, step: int, accelerator: Accelerator) -> int:
    """`length.update` with the longest elapsed time of all processes, so that every process plans the same steps
    (the same lr, and no process waiting for a step the others do not take)."""
    elapsed = torch.tensor([length.elapsed()], device=accelerator.device)
    return length.update(step, accelerator.gather(elapsed).max().item())


def train(args: TrainArguments) -> dict:
    """Train, evaluate and save; returns {"model", "processor", "metrics", "output_dir", "steps",
    "steps_per_second", "train_seconds"}."""
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)  # the same initial weights in every process
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    id2label = load_id2label(args.dataset)
    model = build_model(args, id2label)
    if args.class_weighting:
        model.config.semantic_loss_weights = training_class_weights(args, len(id2label))
    check_crop_fits(model, args)
    processor = image_processor(model, args)
    if accelerator.is_main_process:
        n = sum(p.numel() for p in model.parameters())
        accelerator.print(f"{type(model).__name__}: {n / 1e6:.2f}M parameters, {len(id2label)} classes")

    optimizer = create_optimizer(model, args.learning_rate, args.weight_decay, args.layer_decay)
    length = RunLength(args.max_steps, args.max_train_minutes)
    scheduler = create_scheduler(optimizer, lambda: length.steps, args.warmup_steps, args.backbone_warmup_steps,
                                 args.poly_power)
    # The scheduler stays unprepared (a prepared one steps num_processes times per step); it is still saved.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)
    anneal = hasattr(unwrapped, "attn_mask_probs")

    columns = [args.image_column, args.label_column] + ([args.instance_column] if args.instance_column else [])
    augmentation = Augmentation((args.crop_height, args.crop_width), args.base_short_side,
                                (args.scale_min, args.scale_max), args.jitter, processor.ignore_index)
    decoder = SampleDecoder(args.image_column, args.label_column, args.instance_column, args.id_column or None,
                            augmentation)
    stream = TrainStream(load_split(args.dataset, args.train_split, columns, args.streaming), decoder, args.seed,
                         args.shuffle_buffer, accelerator.process_index, accelerator.num_processes, args.num_workers)
    step = 0
    if args.resume_from_checkpoint:
        state = resume(accelerator, stream, output_dir, args.resume_from_checkpoint)
        step = state["step"]
        if step:
            length.resume(step, state.get("train_seconds") or 0.0)
            restart_schedule(optimizer, scheduler, state, length.steps, accelerator)
    if anneal:
        set_mask_annealing(unwrapped, step, length.steps)

    def run_eval():
        eval_decoder = SampleDecoder(args.image_column, args.label_column, id_column=args.id_column or None)
        samples = eval_samples(load_split(args.dataset, args.eval_split, columns[:2], streaming=True), eval_decoder,
                               accelerator.process_index, accelerator.num_processes, args.max_eval_samples)
        return evaluate_model(model, processor, samples, len(id2label), accelerator, args.per_device_batch_size,
                              processor.ignore_index)

    targets = targets_for(args)
    sample_log = (output_dir / f"samples_{accelerator.process_index}.jsonl").open("a") if args.sample_log else None
    micro_batches = batches(stream, args.per_device_batch_size)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(training_threads(stream.num_workers, args.num_threads))  # back once the workers are gone
    progress = tqdm(total=length.steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    metrics, start_step, run_start = {}, step, time.perf_counter()
    window_loss, window_images, window_start = 0.0, 0, run_start  # what the progress bar shows, every logging_steps
    unlabelled_batches = 0
    while step < length.steps:
        step_samples = [next(micro_batches) for _ in range(args.gradient_accumulation_steps)]
        step_ids = [sample["id"] for samples in step_samples for sample in samples]
        step_lr = optimizer.param_groups[-1]["lr"]
        loss, unlabelled = train_step(model, step_samples, processor, accelerator, targets)
        if unlabelled and not unlabelled_batches:
            logger.warning("a batch with no labelled pixel (all %d): it gets a zero loss; such batches are counted "
                           "in the log", processor.ignore_index)
        unlabelled_batches += unlabelled
        window_loss += loss
        window_images += sum(len(samples) for samples in step_samples)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        if length.minutes is not None:  # re-plan before the scheduler reads the plan for the next step's lr
            progress.total = replan(length, step + 1, accelerator)
        scheduler.step()
        optimizer.zero_grad()
        step += 1
        if anneal:
            set_mask_annealing(unwrapped, step, length.steps)
        if sample_log:
            sample_log.write(json.dumps({"step": step, "ids": step_ids, "lr": step_lr}) + "\n")
            sample_log.flush()
        progress.update(1)
        if step % args.logging_steps == 0 or step >= length.steps:
            loss_mean = accelerator.reduce(torch.tensor(window_loss, device=accelerator.device), "mean").item()
            images = accelerator.reduce(torch.tensor(window_images, device=accelerator.device), "sum").item()
            elapsed = time.perf_counter() - window_start
            steps_done = (step - 1) % args.logging_steps + 1
            progress.set_postfix(loss=f"{loss_mean / steps_done:.3f}", img_s=f"{images / elapsed:.1f}",
                                 lr=f"{scheduler.get_last_lr()[-1]:.2e}", unlabelled_batches=unlabelled_batches)
            window_loss, window_images, window_start = 0.0, 0, time.perf_counter()
        if args.eval_steps and step % args.eval_steps == 0 and step < length.steps:
            scores = run_eval()
            accelerator.print(f"\nstep {step}: mIoU {100 * scores['mean_iou']:.2f} on {scores['num_images']} images")
        if args.save_steps and step % args.save_steps == 0:
            save_checkpoint(accelerator, stream, output_dir, step, args.checkpoints_total_limit, length.steps,
                            length.elapsed())
    progress.close()
    train_seconds = length.elapsed()
    micro_batches.close()  # ends the stream's reader now rather than at interpreter exit
    train_threads = torch.get_num_threads()
    torch.set_num_threads(threads_before)
    steps_per_second = (step - start_step) / (time.perf_counter() - run_start)
    if sample_log:
        sample_log.close()

    if args.eval_split:
        metrics = run_eval()
        accelerator.print(f"{args.eval_split} mIoU {100 * metrics['mean_iou']:.2f} on {metrics['num_images']} images")
    metrics["skipped_samples"] = int(accelerator.reduce(torch.tensor(decoder.skipped, device=accelerator.device), "sum"))
    # each process counts its own micro-batches without a labelled pixel
    metrics["unlabelled_batches"] = int(accelerator.reduce(torch.tensor(unlabelled_batches, device=accelerator.device),
                                                           "sum"))
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir / "model")
        processor.save_pretrained(output_dir / "model")
        results = {"metrics": metrics, "steps": step, "steps_per_second": steps_per_second,
                   "train_seconds": train_seconds, "torch_threads": train_threads,
                   "num_processes": accelerator.num_processes, "training_args": asdict(args),
                   "transformers_version": transformers.__version__}
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return {"model": unwrapped, "processor": processor, "metrics": metrics, "output_dir": output_dir,
            "steps": step, "steps_per_second": steps_per_second, "train_seconds": train_seconds}
