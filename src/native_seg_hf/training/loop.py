"""The Accelerate training loop behind `scripts/train.py`, and the evaluation behind `scripts/evaluate.py`.

One process per device (`accelerate launch`), each reading its own part of a `datasets` stream (see `data.py` for
why the data loader is not passed through `accelerator.prepare`). Per optimizer step: `gradient_accumulation_steps`
micro-batches under `accelerator.accumulate`, gradient clipping, AdamW with layer-wise lr decay and EoMT's
schedule (`optim.py`), mask annealing for query models. Every `save_steps` a checkpoint folder
`<output_dir>/checkpoints/step_<N>` gets `accelerator.save_state` (model, optimizer, scheduler, RNGs) plus
`stream_<rank>.json` (each process's position in its stream) and `trainer_state.json` (the step);
`resume_from_checkpoint="latest"` continues from the newest one with the same samples in the same order.
"""

import json
import logging
import math
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
from ..models.modeling_senatra import SeNaTraForSemanticSegmentation, SeNaTraForUniversalSegmentation
from .data import Augmentation, SampleDecoder, TrainStream, batches, collate, eval_samples, load_id2label, load_split
from .mask_annealing import set_mask_annealing
from .optim import create_optimizer, create_scheduler

logger = logging.getLogger(__name__)

MODELS = {
    "senatra": SeNaTraForSemanticSegmentation,
    "senatra-universal": SeNaTraForUniversalSegmentation,
    "segmenter": SegmenterForSemanticSegmentation,
    "eomt": EomtForUniversalSegmentation,
}
QUERY_MODELS = ("senatra-universal", "eomt")


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
    train_split: str = "train"
    eval_split: str = "validation"
    image_column: str = "image"
    label_column: str = field(default="label", metadata={"help": "class-id maps (255 = unlabelled)"})
    instance_column: str | None = field(default=None, metadata={"help": "instance-id maps, for instance/panoptic tasks"})
    id_column: str | None = field(default="id", metadata={"help": "sample names, for logs (none: set it empty)"})
    streaming: bool = field(default=True, metadata={"help": "stream the training split (IterableDataset with a "
                                                             "shuffle buffer, split between processes by node)"})
    shuffle_buffer: int = 256
    crop_height: int = 256
    crop_width: int = 352
    base_short_side: int | None = field(default=None, metadata={"help": "short side before random scaling "
                                                                        "(default: the image's own)"})
    scale_min: float = 0.5
    scale_max: float = 2.0
    jitter: bool = field(default=True, metadata={"help": "photometric jitter"})
    eval_short_side: int | None = field(default=None, metadata={"help": "evaluation resize (default: crop_height)"})
    max_eval_samples: int | None = None
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = field(default=1.0, metadata={"help": "layer-wise lr decay (EoMT 0.8 when fine-tuning; 1 "
                                                              "from scratch)"})
    warmup_steps: int = 0
    backbone_warmup_steps: int = field(default=0, metadata={"help": "> 0: EoMT's two-stage warm-up (backbone "
                                                                    "frozen during --warmup_steps)"})
    poly_power: float = 0.9
    max_grad_norm: float = 1.0
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


def build_model(args: TrainArguments, id2label: dict[int, str]):
    """The model to train: from `model_name_or_path`, from `config`, or from a SeNaTra preset."""
    if args.model not in MODELS:
        raise ValueError(f"--model must be one of {list(MODELS)}, got {args.model!r}")
    if args.task != "semantic" and args.model not in QUERY_MODELS:
        raise ValueError(f"task {args.task!r} needs a query model ({', '.join(QUERY_MODELS)}), not {args.model}")
    model_class = MODELS[args.model]
    labels = {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}
    if args.model_name_or_path:
        return model_class.from_pretrained(args.model_name_or_path, ignore_mismatched_sizes=True, **labels)
    if args.config:
        config = AutoConfig.from_pretrained(args.config, **labels)
    elif args.model == "segmenter":
        config = SegmenterConfig(backbone_config=SeNaTraConfig.from_preset(args.preset), **labels)
    elif args.model == "eomt":
        config = EomtConfig(image_size=args.crop_height, **labels)
    else:
        config = SeNaTraConfig.from_preset(args.preset, **labels)
    return model_class(config)


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


def targets_for(args: TrainArguments) -> str:
    if args.model not in QUERY_MODELS:
        return "labels"
    return "class_masks" if args.task == "semantic" else "instance_masks"


def to_device(batch: dict, device) -> dict:
    return {
        key: [item.to(device) for item in value] if isinstance(value, list) else value.to(device)
        for key, value in batch.items()
    }


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


def latest_checkpoint(output_dir: Path) -> Path | None:
    folders = sorted((output_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return folders[-1] if folders else None


def save_checkpoint(accelerator: Accelerator, stream: TrainStream, output_dir: Path, step: int,
                    limit: int | None) -> Path:
    folder = output_dir / "checkpoints" / f"step_{step}"
    accelerator.save_state(str(folder))
    (folder / f"stream_{accelerator.process_index}.json").write_text(json.dumps(stream.state_dict()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        older = sorted((output_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for stale in older[: -limit] if limit else []:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return folder


def resume(accelerator: Accelerator, stream: TrainStream, output_dir: Path, checkpoint: str) -> int:
    """Load a checkpoint (or the latest one) into the run; returns its step (0 when 'latest' finds none)."""
    folder = latest_checkpoint(output_dir) if checkpoint == "latest" else Path(checkpoint)
    if folder is None:
        logger.warning("no checkpoint in %s: starting from scratch", output_dir / "checkpoints")
        return 0
    accelerator.load_state(str(folder))
    stream.load_state_dict(json.loads((folder / f"stream_{accelerator.process_index}.json").read_text()))
    step = json.loads((folder / "trainer_state.json").read_text())["step"]
    accelerator.print(f"resumed from {folder} (step {step})")
    return step


def train(args: TrainArguments) -> dict:
    """Train, evaluate and save; returns {"model", "processor", "metrics", "output_dir", "steps_per_second"}."""
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)  # the same initial weights in every process
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    id2label = load_id2label(args.dataset)
    model = build_model(args, id2label)
    processor = image_processor(model, args)
    if accelerator.is_main_process:
        n = sum(p.numel() for p in model.parameters())
        accelerator.print(f"{type(model).__name__}: {n / 1e6:.2f}M parameters, {len(id2label)} classes")

    optimizer = create_optimizer(model, args.learning_rate, args.weight_decay, args.layer_decay)
    scheduler = create_scheduler(optimizer, args.max_steps, args.warmup_steps, args.backbone_warmup_steps,
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
                         args.shuffle_buffer, accelerator.process_index, accelerator.num_processes)
    step = resume(accelerator, stream, output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else 0
    if anneal:
        set_mask_annealing(unwrapped, step, args.max_steps)

    def run_eval():
        eval_decoder = SampleDecoder(args.image_column, args.label_column, id_column=args.id_column or None)
        samples = eval_samples(load_split(args.dataset, args.eval_split, columns[:2], streaming=True), eval_decoder,
                               accelerator.process_index, accelerator.num_processes, args.max_eval_samples)
        return evaluate_model(model, processor, samples, len(id2label), accelerator, args.per_device_batch_size,
                              processor.ignore_index)

    targets = targets_for(args)
    sample_log = (output_dir / f"samples_{accelerator.process_index}.jsonl").open("a") if args.sample_log else None
    micro_batches = batches(stream, args.per_device_batch_size)
    progress = tqdm(total=args.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    metrics, start_step, run_start = {}, step, time.perf_counter()
    window_loss, window_images, window_start = 0.0, 0, run_start  # what the progress bar shows, every logging_steps
    while step < args.max_steps:
        step_ids = []
        for _ in range(args.gradient_accumulation_steps):
            samples = next(micro_batches)
            step_ids += [sample["id"] for sample in samples]
            batch = to_device(collate(samples, processor, targets), accelerator.device)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
            window_loss += loss.item() / args.gradient_accumulation_steps
            window_images += len(samples)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1
        if anneal:
            set_mask_annealing(unwrapped, step, args.max_steps)
        if sample_log:
            sample_log.write(json.dumps({"step": step, "ids": step_ids}) + "\n")
            sample_log.flush()
        progress.update(1)
        if step % args.logging_steps == 0 or step == args.max_steps:
            loss_mean = accelerator.reduce(torch.tensor(window_loss, device=accelerator.device), "mean").item()
            images = accelerator.reduce(torch.tensor(window_images, device=accelerator.device), "sum").item()
            elapsed = time.perf_counter() - window_start
            steps_done = (step - 1) % args.logging_steps + 1
            progress.set_postfix(loss=f"{loss_mean / steps_done:.3f}", img_s=f"{images / elapsed:.1f}",
                                 lr=f"{scheduler.get_last_lr()[-1]:.2e}")
            window_loss, window_images, window_start = 0.0, 0, time.perf_counter()
        if args.eval_steps and step % args.eval_steps == 0 and step < args.max_steps:
            scores = run_eval()
            accelerator.print(f"\nstep {step}: mIoU {scores['mean_iou']:.4f} on {scores['num_images']} images")
        if args.save_steps and step % args.save_steps == 0:
            save_checkpoint(accelerator, stream, output_dir, step, args.checkpoints_total_limit)
    progress.close()
    micro_batches.close()  # ends the stream's reader now rather than at interpreter exit
    steps_per_second = (step - start_step) / (time.perf_counter() - run_start)
    if sample_log:
        sample_log.close()

    if args.eval_split:
        metrics = run_eval()
        accelerator.print(f"{args.eval_split} mIoU {metrics['mean_iou']:.4f} on {metrics['num_images']} images")
    metrics["skipped_samples"] = int(accelerator.reduce(torch.tensor(decoder.skipped, device=accelerator.device), "sum"))
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir / "model")
        processor.save_pretrained(output_dir / "model")
        results = {"metrics": metrics, "steps": step, "steps_per_second": steps_per_second,
                   "num_processes": accelerator.num_processes, "training_args": asdict(args),
                   "transformers_version": transformers.__version__}
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return {"model": unwrapped, "processor": processor, "metrics": metrics, "output_dir": output_dir,
            "steps_per_second": steps_per_second}
