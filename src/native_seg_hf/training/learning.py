"""Learning-quality benchmark: train semantic segmentation models from random initialisation with ONE shared recipe
and score them on the validation split at the labels' original size.

A *recipe* fixes everything but the model: crops, augmentation, batch, optimizer, schedule, evaluation size and
how often to evaluate. With the same recipe and seed every model sees the same batches (the same images, crops,
flips and jitter, in the same order), so curves differ only by the model. One run writes one JSON
(`run_record`): model, recipe, seed, validation mIoU by step (percent), per-class IoU, parameters, GFLOPs at the
evaluation size, step time, the command, the commit and the hardware. `scripts/benchmark_learning.py` is the
command line; `--render` writes the README's table from those files only.

Models (`MODEL_BUILDERS`): `senatra` (the native SeNaTra the main job trains: the `nano-s16` preset, final tokens at
stride 16, grouping local/local with one iteration, native semantic head), `senatra-none` (the same with
strided-conv downsampling, the paper's ablation), `senatra-nano` and `senatra-nano-none` (the `nano` preset, final
tokens at stride 32, grouping local/local/dense, with and without grouping), `senatra-universal` (SeNaTra-Nano
with EoMT-style queries, trained on one mask per class present with Mask2Former's loss and mask annealing over
the schedule, scored through the semantic post-processing `sum_q p(c|q) sigmoid(mask_q)`), `segformer-b0`
(Transformers' `SegformerForSemanticSegmentation`, B0 size), `eomt-vit-s` (Transformers' `EomtForUniversalSegmentation`
at ViT-S size, trained like `senatra-universal`), `segmenter-linear` (Segmenter's linear decoder on a
small Transformers Dinov2 ViT). Config overrides (`overrides`) give ablation variants, recorded in the run's name.

Data are held in memory, decoded once (CamVid is 367 + 101 images): the benchmark measures learning, not input
pipelines.
"""

import json
import math
import platform
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    Dinov2Config, EomtConfig, EomtForUniversalSegmentation, SegformerConfig, SegformerForSemanticSegmentation,
)

from ..metrics import MeanIoU
from ..models.configuration_segmenter import SegmenterConfig
from ..models.configuration_senatra import SENATRA_PRESETS, SeNaTraConfig
from ..models.modeling_segmenter import SegmenterForSemanticSegmentation
from ..models.image_processing_senatra import SeNaTraImageProcessor, semantic_logits
from ..models.modeling_senatra import (
    SeNaTraForSemanticSegmentation, SeNaTraForUniversalSegmentation, semantic_cross_entropy,
)
from .data import Augmentation, SampleDecoder, class_weights, load_id2label, load_split
from .loop import with_our_loss_rules
from .mask_annealing import set_mask_annealing
from .optim import WeightAverage, create_optimizer, create_scheduler

IMAGE_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's, as every model's processor uses
IMAGE_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
INPUT_DIVISOR = 32  # every model here takes sides that are multiples of 32 (SeNaTra's last stride)


@dataclass(frozen=True)
class Recipe:
    """One shared training and evaluation recipe.

    Args:
        crop: (height, width) of the training crops.
        base_short_side: the training image's short side before random scaling (None: its own size).
        scale_range: random scale factor range; `flip` horizontal flips; `jitter` photometric jitter.
        batch_size, learning_rate, weight_decay: AdamW's (betas 0.9/0.999), one lr for every parameter.
        warmup_steps, schedule_steps, poly_power: linear warm-up, then polynomial decay to 0 at `schedule_steps`.
        max_grad_norm: gradient clipping.
        eval_short_side: validation images are resized to this short side (padded to a multiple of 32), and the
            predictions are resized back to the labels' original size to be scored.
        eval_every: evaluate after every this many steps.
        class_weighting: None (plain cross-entropy, each model's own loss) or "enet" (`data.class_weights` from
            the training split's labels), applied to every semantic model alike, outside the model.
        grouping_lr_multiplier: lr multiplier of grouping's assignment scalars (`optim.layer_decay_groups`); a
            no-op for models without grouping layers, so their runs are the same as without it.
        weight_average: None, or the decay of an exponential moving average of the weights
            (`optim.WeightAverage`) that is evaluated (and saved) instead of the last weights.
    """

    crop: tuple[int, int]
    base_short_side: int | None
    scale_range: tuple[float, float]
    jitter: bool
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    schedule_steps: int
    eval_short_side: int
    eval_every: int
    poly_power: float = 0.9
    max_grad_norm: float = 1.0
    class_weighting: str | None = None
    grouping_lr_multiplier: float = 1.0
    weight_average: float | None = None


CAMVID_MAIN = Recipe(crop=(128, 160), base_short_side=180, scale_range=(0.5, 2.0), jitter=True, batch_size=8,
                     learning_rate=4e-4, weight_decay=0.05, warmup_steps=50, schedule_steps=2000, eval_short_side=180,
                     eval_every=250)
CAMVID_FULL = Recipe(crop=(256, 352), base_short_side=None, scale_range=(0.5, 1.5), jitter=False, batch_size=8,
                     learning_rate=6e-4, weight_decay=0.01, warmup_steps=100, schedule_steps=2000, eval_short_side=352,
                     eval_every=250)
RECIPES = {
    # The main job's recipe (scripts/main_job.py): 128x160 crops of half-size CamVid, scored at 480x360.
    "camvid-main": CAMVID_MAIN,
    # The same with a class-weighted loss: five of CamVid's eleven classes (pole, sign, fence, pedestrian,
    # bicyclist; 5% of the pixels) stay at 0 IoU for every model under plain cross-entropy.
    "camvid-main-balanced": replace(CAMVID_MAIN, class_weighting="enet"),
    "camvid-main-balanced-glr10": replace(CAMVID_MAIN, class_weighting="enet", grouping_lr_multiplier=10.0),
    # Scored on an average of the weights (decay 0.995, ~200 steps): the last weights flip whole classes (tree vs
    # building) from one evaluation to the next, for every model.
    "camvid-main-balanced-ema": replace(CAMVID_MAIN, class_weighting="enet", weight_average=0.995),
    # The same over twice the schedule: at 2000 steps every model is still gaining 2-3 points per 500 steps and
    # the seeds' final scores differ by ~5 points, most of it tree against building.
    "camvid-main-balanced-4k": replace(CAMVID_MAIN, class_weighting="enet", schedule_steps=4000, eval_every=500),
    # SegFormer-B0's recipe from the issue: 256x352 crops of full-size CamVid, validation resized to 352x480.
    "camvid-full": CAMVID_FULL,
    # The same with the class-weighted loss of camvid-main-balanced.
    "camvid-full-balanced": replace(CAMVID_FULL, class_weighting="enet"),
    # ... over twice the schedule, as camvid-main-balanced-4k: the 2000-step runs still gain 1-5 points over their
    # last 500 steps and their seeds differ by up to 3 points.
    "camvid-full-balanced-4k": replace(CAMVID_FULL, class_weighting="enet", schedule_steps=4000, eval_every=500),
    # A few steps on whatever data is there (the bundled fixture in tests): checks the machinery, not learning.
    "smoke": Recipe(crop=(64, 96), base_short_side=96, scale_range=(0.8, 1.2), jitter=True, batch_size=2,
                    learning_rate=4e-4, weight_decay=0.05, warmup_steps=1, schedule_steps=4, eval_short_side=64,
                    eval_every=2),
}


# A builder makes a model from random initialisation: build(num_labels, overrides, recipe), `overrides` being config
# fields (a variant) and `recipe` the one it will train with (a model with a fixed input size takes its crop).


def senatra_builder(preset: str, grouping: str | None = None):
    def build(num_labels: int, overrides: dict, recipe: Recipe) -> torch.nn.Module:
        transitions = len(SENATRA_PRESETS[preset]["depths"]) - 1
        extra = {"grouping_types": [grouping] * transitions} if grouping else {}
        return SeNaTraForSemanticSegmentation(SeNaTraConfig.from_preset(preset, num_labels=num_labels,
                                                                        **{**extra, **overrides}))
    return build


def senatra_universal(num_labels: int, overrides: dict, recipe: Recipe) -> torch.nn.Module:
    # Nano's last stage has 2 blocks: both take the queries; 100 queries as EoMT uses for semantic segmentation.
    config = SeNaTraConfig.from_preset("nano", num_labels=num_labels, num_queries=100, num_blocks=2, **overrides)
    return SeNaTraForUniversalSegmentation(config)


def segformer_b0(num_labels: int, overrides: dict, recipe: Recipe) -> torch.nn.Module:
    # SegformerConfig's defaults are the B0 size (widths 32/64/160/256, depths 2/2/2/2, decoder 256).
    return SegformerForSemanticSegmentation(SegformerConfig(num_labels=num_labels, semantic_loss_ignore_index=255,
                                                            **overrides))


def eomt_vit_s(num_labels: int, overrides: dict, recipe: Recipe) -> torch.nn.Module:
    # EoMT's ViT-S (384 wide, 12 blocks, 6 heads, patch 16, 4 register tokens), queries in the last 4 blocks, 100
    # queries as for semantic segmentation, with the loss fixes scripts/train.py gives it. Its position embeddings
    # are learned for one square size, so it takes the recipe's longer crop side: crops are padded to that square,
    # evaluation runs square windows (`predict`).
    config = EomtConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=16,
                        image_size=max(recipe.crop), num_queries=100, num_blocks=4, num_labels=num_labels, **overrides)
    return with_our_loss_rules(EomtForUniversalSegmentation(config))


def segmenter_linear(num_labels: int, overrides: dict, recipe: Recipe) -> torch.nn.Module:
    # A ViT-Ti-sized Dinov2 (192 wide, 12 blocks, 3 heads, patch 16): the smallest ViT Segmenter reports.
    backbone = Dinov2Config(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, patch_size=16,
                            image_size=224, out_features=["stage12"])
    return SegmenterForSemanticSegmentation(SegmenterConfig(backbone_config=backbone, decoder_type="linear",
                                                            num_labels=num_labels, **overrides))


MODEL_BUILDERS = {
    "senatra": senatra_builder("nano-s16"),
    "senatra-none": senatra_builder("nano-s16", "none"),
    "senatra-nano": senatra_builder("nano"),
    "senatra-nano-none": senatra_builder("nano", "none"),
    "senatra-universal": senatra_universal,
    "segformer-b0": segformer_b0,
    "eomt-vit-s": eomt_vit_s,
    "segmenter-linear": segmenter_linear,
}


def run_name(model: str, overrides: dict) -> str:
    """`model`, or `model[key=value,...]` for an ablation variant (so it never mixes with the model's own runs)."""
    if not overrides:
        return model
    return model + "[" + ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(overrides.items())) + "]"


def file_name(name: str) -> str:
    """`name` (with a variant's JSON in it) as a portable file name."""
    return name.replace("/", "_").replace('"', "").replace(" ", "")


def parse_run_name(name: str) -> tuple[str, dict]:
    """The inverse of `run_name`: `"senatra[grouping_iterations=2]"` -> `("senatra", {"grouping_iterations": 2})`."""
    model, bracket, rest = name.partition("[")
    if model not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {model!r}: choose from {sorted(MODEL_BUILDERS)}")
    overrides, decoder, position = {}, json.JSONDecoder(), 0
    if bracket and not rest.endswith("]"):
        raise ValueError(f"{name!r}: a variant is model[key=json,...]")
    rest = rest[:-1]
    while position < len(rest):
        key, equals, _ = rest[position:].partition("=")
        if not equals or not key.isidentifier():
            raise ValueError(f"{name!r}: a variant is model[key=json,...]")
        value, end = decoder.raw_decode(rest, position + len(key) + 1)
        overrides[key] = value
        position = end + (end < len(rest) and rest[end] == ",")
    return model, overrides


# ----------------------------------------------------------------------------------------------------------
# Data: decoded once, batches drawn deterministically from (seed, step).
# ----------------------------------------------------------------------------------------------------------


def load_samples(dataset: str | Path, split: str) -> list[dict]:
    """Every readable sample of a split as {"id", "image" (PIL RGB), "label" (H, W) uint8}, in the split's order.

    Streams the folder: `datasets` caches none of its data (it leaves only an empty lock file in its cache folder)."""
    decoder = SampleDecoder(id_column="id")
    samples = [decoder(record) for record in load_split(dataset, split, ["image", "label"], streaming=True)]
    samples = [sample for sample in samples if sample is not None]
    if not samples:
        raise ValueError(f"{dataset} split {split!r} has no readable samples")
    return samples


def normalise(images: list[np.ndarray]) -> torch.Tensor:
    """(B, H, W, 3) uint8 images -> (B, 3, H, W) float, ImageNet mean/std."""
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - IMAGE_MEAN) / IMAGE_STD


class BatchSource:
    """The recipe's training batches: passes over the data in a seeded random order, each sample augmented with
    a generator seeded by (seed, pass, position), so batch `step` is the same for every model and every run."""

    def __init__(self, samples: list[dict], recipe: Recipe, seed: int):
        self.samples, self.recipe, self.seed = samples, recipe, seed
        self.augmentation = Augmentation(recipe.crop, recipe.base_short_side, recipe.scale_range, recipe.jitter)

    def batch(self, step: int) -> dict:
        images, labels = [], []
        for index in range(step * self.recipe.batch_size, (step + 1) * self.recipe.batch_size):
            epoch, position = divmod(index, len(self.samples))
            order = list(range(len(self.samples)))
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            sample = self.samples[order[position]]
            rng = random.Random((self.seed * 100_003 + epoch) * 1_000_003 + position)
            image, label, _ = self.augmentation(sample["image"], sample["label"], None, rng)
            images.append(np.asarray(image))
            labels.append(label)
        return {"pixel_values": normalise(images), "labels": torch.from_numpy(np.stack(labels)).long()}


def class_mask_targets(labels: torch.Tensor, ignore_index: int = 255) -> dict:
    """A query model's targets for semantic maps (B, H, W): per image one binary mask per class present."""
    mask_labels, class_labels = [], []
    for label in labels:
        classes = label.unique()
        classes = classes[classes != ignore_index]
        mask_labels.append((label[None] == classes[:, None, None]).float())
        class_labels.append(classes)
    return {"mask_labels": mask_labels, "class_labels": class_labels}


def square_input_side(model) -> int | None:
    """The side of the one square input size a model takes (Transformers' EoMT, whose learned position embeddings
    and attention-mask grid are fixed by `image_size`), or None for models that take any multiple of their stride."""
    config = getattr(model, "config", None)
    return config.image_size if isinstance(config, EomtConfig) else None


def pad_to_square(batch: dict, side: int) -> dict:
    """A training batch padded at the bottom and right to side x side: zero pixels (the mean colour once
    normalised), unlabelled (255) labels."""
    height, width = batch["pixel_values"].shape[-2:]
    if height > side or width > side:
        raise ValueError(f"crops of {height}x{width} do not fit the model's {side}x{side} input")
    pad = (0, side - width, 0, side - height)
    return {"pixel_values": F.pad(batch["pixel_values"], pad), "labels": F.pad(batch["labels"], pad, value=255)}


def model_inputs(model, batch: dict) -> dict:
    """The batch as the model takes it: label maps for semantic models, class masks for query models, padded to
    the square a fixed-size model takes."""
    side = square_input_side(model)
    if side is not None:
        batch = pad_to_square(batch, side)
    if hasattr(model, "attn_mask_probs"):
        return {"pixel_values": batch["pixel_values"], **class_mask_targets(batch["labels"])}
    return batch


def predict(model, pixels: torch.Tensor) -> torch.Tensor:
    """Per-pixel class scores (`semantic_logits`) of evaluation pixels; a fixed-size model sees them through square
    windows of its input size (the last flush with the edge; sides shorter than the window zero-padded), its
    scores averaged where windows overlap."""
    side = square_input_side(model)
    if side is None:
        return semantic_logits(model(pixel_values=pixels))
    windows = SeNaTraImageProcessor(size_divisor=model.config.patch_size)
    return windows.sliding_window_inference(model, pixels, side).logits


def eval_inputs(image: Image.Image, short_side: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """An evaluation image resized to `short_side`, normalised and zero-padded (bottom/right) to a multiple of 32;
    returns the pixels and the resized (height, width) to crop the predictions back to."""
    factor = short_side / min(image.size)
    width, height = round(image.width * factor), round(image.height * factor)
    pixels = normalise([np.asarray(image.resize((width, height), Image.BILINEAR))])
    pad_h, pad_w = -height % INPUT_DIVISOR, -width % INPUT_DIVISOR
    return F.pad(pixels, (0, pad_w, 0, pad_h)), (height, width)


@torch.no_grad()
def evaluate_semantic(model, samples: list[dict], num_labels: int, short_side: int) -> dict:
    """Mean IoU (percent) and per-class IoU over `samples`, predictions scored at each label's own size."""
    model.eval()
    metric = MeanIoU(num_labels=num_labels, ignore_index=255)
    for sample in samples:
        pixels, (height, width) = eval_inputs(sample["image"], short_side)
        logits = predict(model, pixels)
        # Keep the part of the logits that covers the image (not the padding), then resize to the label.
        scale_h, scale_w = logits.shape[-2] / pixels.shape[-2], logits.shape[-1] / pixels.shape[-1]
        logits = logits[..., : math.ceil(height * scale_h), : math.ceil(width * scale_w)]
        logits = F.interpolate(logits, size=sample["label"].shape, mode="bilinear", align_corners=False)
        metric.update(logits.argmax(1)[0].numpy(), sample["label"])
    model.train()
    return percent_scores(metric)


def percent_scores(metric: MeanIoU) -> dict:
    """{"mean_iou", "per_class_iou"} in percent; None for a class absent from both labels and predictions."""
    result = metric.compute()
    return {"mean_iou": 100 * float(result["mean_iou"]),
            "per_class_iou": [None if math.isnan(v) else 100 * float(v) for v in result["per_category_iou"]]}


def gflops(model, short_side: int, image_size: tuple[int, int]) -> float:
    """Forward GFLOPs (multiply-add = 2 FLOPs) of predicting one evaluation-size image (every window of a fixed-size
    model), counted by torch's FlopCounterMode."""
    height, width = image_size
    factor = short_side / min(height, width)
    size = [math.ceil(round(s * factor) / INPUT_DIVISOR) * INPUT_DIVISOR for s in (height, width)]
    model.eval()
    # With gradients on: FlopCounterMode's module hooks fail under no_grad on modules fed a parameter (queries).
    with FlopCounterMode(display=False) as counter:
        predict(model, torch.zeros(1, 3, *size))
    model.train()
    return counter.get_total_flops() / 1e9


# ----------------------------------------------------------------------------------------------------------
# One run.
# ----------------------------------------------------------------------------------------------------------


def make_optimizer(model, recipe: Recipe):
    optimizer = create_optimizer(model, recipe.learning_rate, weight_decay=recipe.weight_decay,
                                 grouping_lr_multiplier=recipe.grouping_lr_multiplier)
    scheduler = create_scheduler(optimizer, recipe.schedule_steps, warmup_steps=recipe.warmup_steps,
                                 power=recipe.poly_power)
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, batch: dict, max_grad_norm: float,
               weights: list[float] | None = None) -> float:
    """One optimizer step on the model's own loss, or, with class `weights`, on the weighted cross-entropy of its
    semantic logits (computed here, outside the model, so that it is the same for every model)."""
    if weights is None:
        loss = model(**model_inputs(model, batch)).loss
    elif hasattr(model, "attn_mask_probs"):
        raise ValueError("class weighting applies to semantic models; query models train on their mask loss")
    else:
        loss = semantic_cross_entropy(semantic_logits(model(pixel_values=batch["pixel_values"])), batch["labels"],
                                      255, weights)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def portable_path(path: str | Path) -> str:
    """A path as a run record keeps it: relative to the working directory when inside it, else with the home
    folder written `~`, so committed records name no machine's folders."""
    path = Path(path).expanduser().resolve()
    for base, prefix in ((Path.cwd().resolve(), ""), (Path.home().resolve(), "~/")):
        if path.is_relative_to(base):
            return prefix + str(path.relative_to(base))
    return str(path)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def hardware() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or None,
            "torch_threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__}


@dataclass
class RunSpec:
    model: str
    recipe: str
    seed: int = 0
    steps: int | None = None  # default: the recipe's schedule length
    overrides: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return run_name(self.model, self.overrides)

    @property
    def recipe_label(self) -> str:
        """The recipe's name, marked when the run stops before the schedule ends (its lr never decayed to 0, so
        it is not comparable with complete runs)."""
        steps = self.steps or RECIPES[self.recipe].schedule_steps
        return self.recipe if steps >= RECIPES[self.recipe].schedule_steps else f"{self.recipe}@{steps}"

    def path(self, results: Path) -> Path:
        return results / file_name(f"{self.recipe_label}__{self.name}__seed{self.seed}.json")


def train_and_evaluate(spec: RunSpec, dataset: str | Path, results: Path, command: str, log=print,
                       save_model: Path | None = None) -> dict:
    """Train `spec.model` from random initialisation with the recipe, evaluating every `eval_every` steps, and
    write its run record to `spec.path(results)` (through a `.partial` file while it runs); with `save_model`,
    the trained model is saved there too (`save_pretrained`)."""
    recipe = RECIPES[spec.recipe]
    steps = spec.steps or recipe.schedule_steps
    id2label = load_id2label(dataset)
    train_samples, val_samples = load_samples(dataset, "train"), load_samples(dataset, "validation")
    torch.manual_seed(spec.seed)
    model = MODEL_BUILDERS[spec.model](len(id2label), spec.overrides, recipe)
    model.train()
    optimizer, scheduler = make_optimizer(model, recipe)
    average = WeightAverage(model, recipe.weight_average) if recipe.weight_average else None
    scored = average.model if average else model  # what is evaluated and saved
    source = BatchSource(train_samples, recipe, spec.seed)
    weights = class_weights((sample["label"] for sample in train_samples), len(id2label), recipe.class_weighting)
    record = {
        "model": spec.name, "base_model": spec.model, "overrides": spec.overrides, "recipe": spec.recipe_label,
        "recipe_config": asdict(recipe), "seed": spec.seed, "steps": steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "gflops_at_eval_size": gflops(model, recipe.eval_short_side, val_samples[0]["label"].shape),
        "eval_size_short_side": recipe.eval_short_side, "train_images": len(train_samples),
        "val_images": len(val_samples), "id2label": {str(k): v for k, v in id2label.items()},
        "class_weights": None if weights is None else [round(w, 4) for w in weights],
        "val_miou_by_step": {}, "per_class_iou_by_step": {}, "train_loss_by_step": {},
        "command": command, "commit": git_commit(), "hardware": hardware(), "dataset": portable_path(dataset),
    }
    partial = spec.path(results).with_suffix(".partial")
    results.mkdir(parents=True, exist_ok=True)
    losses, train_seconds = [], 0.0  # evaluation time is not training time
    for step in range(1, steps + 1):
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, scheduler, source.batch(step - 1), recipe.max_grad_norm, weights))
        if hasattr(model, "attn_mask_probs"):  # EoMT's mask annealing, over the recipe's schedule
            set_mask_annealing(model, step, recipe.schedule_steps)
        if average:
            average.update(step)
        train_seconds += time.perf_counter() - start
        if step % recipe.eval_every == 0 or step == steps:
            scores = evaluate_semantic(scored, val_samples, len(id2label), recipe.eval_short_side)
            record["val_miou_by_step"][str(step)] = round(scores["mean_iou"], 2)
            record["per_class_iou_by_step"][str(step)] = scores["per_class_iou"]
            record["train_loss_by_step"][str(step)] = round(float(np.mean(losses[-recipe.eval_every:])), 4)
            record["train_seconds"] = round(train_seconds, 1)
            record["seconds_per_step"] = round(train_seconds / step, 3)
            partial.write_text(json.dumps(record, indent=1))
            log(f"{spec.name} {spec.recipe} seed {spec.seed} step {step}: val mIoU {scores['mean_iou']:.1f}, "
                f"train loss {record['train_loss_by_step'][str(step)]:.3f}, {train_seconds / step:.2f} s/step")
    if save_model is not None:  # with the dataset's class names, so the saved model reads like any other
        scored.config.id2label = dict(id2label)
        scored.config.label2id = {name: index for index, name in id2label.items()}
        scored.save_pretrained(save_model)
    partial.rename(spec.path(results))
    return record


def time_models(models: list[str], recipe_name: str, dataset: str | Path, steps: int = 6, seed: int = 0,
                num_labels: int | None = None) -> dict:
    """Seconds per training step of each model (a name of `MODEL_BUILDERS`, or a variant's `run_name`), measured by
    alternating their steps on the same batches in one process (never compare times from separate runs on a shared
    machine). The first step of each is a warm-up."""
    recipe = RECIPES[recipe_name]
    samples = load_samples(dataset, "train")
    num_labels = num_labels or len(load_id2label(dataset))
    source = BatchSource(samples, recipe, seed)
    weights = class_weights((sample["label"] for sample in samples), num_labels, recipe.class_weighting)
    runs = {}
    for name in models:
        torch.manual_seed(seed)
        model_name, overrides = parse_run_name(name)
        model = MODEL_BUILDERS[model_name](num_labels, overrides, recipe).train()
        runs[name] = (model, *make_optimizer(model, recipe))
    times = {name: [] for name in models}
    for step in range(steps + 1):
        batch = source.batch(step)
        for name, (model, optimizer, scheduler) in runs.items():
            start = time.perf_counter()
            train_step(model, optimizer, scheduler, batch, recipe.max_grad_norm, weights)
            if step:
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}
