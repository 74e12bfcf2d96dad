"""Segmentation data for training and evaluation: one loader for every `datasets` source, a resumable training
stream, augmentation and collation.

Sources. `load_split(source, split)` is a single `datasets.load_dataset(source, split=...)` call, so a Hub dataset id
(online) and a local folder of Parquet shards (offline, as `scripts/prepare_data.py` writes them: `data/<split>-*.parquet`
plus `id2label.json`) go through the same code; a local folder gets a cache keyed by its path and content
(`local_cache_dir`). Image and label columns are named by the caller and read as raw bytes (`Image(decode=False)`); decoding happens here, so a corrupt sample is skipped and counted instead of crashing, and
replaying a stream position costs no decoding.

Distribution: `TrainStream` splits the data between processes with `datasets.distributed.split_dataset_by_node`
(whole shards when their number divides the world size, else every world_size-th example), and the training loop
feeds its batches to the model directly, without `accelerator.prepare` on a data loader: Accelerate's own sharding
or batch dispatching would split the already split stream a second time.

Exact resume: `datasets`' `IterableDataset.state_dict()` drops the content of the shuffle buffer (its
`load_state_dict` warns that the buffer is refilled), which loses up to `buffer_size` samples of the pass. The
shuffle is deterministic in (seed, epoch), so `TrainStream` saves (epoch, position) instead and, on resume, replays
the pass's undecoded records up to `position`: every sample of the current pass is seen exactly once.
"""

import hashlib
import io
import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
from datasets import Image as ImageFeature
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from huggingface_hub import hf_hub_download
from PIL import Image, ImageEnhance, UnidentifiedImageError

logger = logging.getLogger(__name__)

DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError)


def load_id2label(source: str | Path) -> dict[int, str]:
    """The dataset's `id2label.json` ({"0": "sky", ...}) from a local folder or a Hub dataset repo."""
    folder = Path(source)
    path = folder / "id2label.json" if folder.is_dir() else hf_hub_download(str(source), "id2label.json", repo_type="dataset")
    return {int(key): name for key, name in json.loads(Path(path).read_text()).items()}


def local_cache_dir(folder: Path) -> str:
    """A `datasets` cache folder of a local dataset folder's own, named by its resolved path and the name, size and
    modification time of each file in it.

    `datasets` keys the cache entry of a local folder by the folder's name and its data-file patterns, not by its
    location or content: two folders both called `camvid` (a 2-image test copy and the real set) share one entry,
    and whichever was loaded first is served for both, without a word. Under this key a folder never gets
    another folder's entry, nor its own older content.
    """
    folder = folder.resolve()
    digest = hashlib.sha256(str(folder).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"\0{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "native_seg_hf_local" / digest.hexdigest()[:32])


def load_split(source: str | Path, split: str, columns: list[str], streaming: bool = True):
    """One split of a dataset (a Hub id or a local folder), with the given image-like `columns` left undecoded.

    Returns an `IterableDataset` with `streaming`, else a `Dataset`. A local folder loaded without streaming is
    cached under its own path and content (`local_cache_dir`)."""
    folder = Path(source)
    cache_dir = local_cache_dir(folder) if folder.is_dir() and not streaming else None
    dataset = load_dataset(str(source), split=split, streaming=streaming, cache_dir=cache_dir)
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{source} split {split!r} has no column(s) {missing}; it has {dataset.column_names} "
            "(name them with --image_column / --label_column)"
        )
    for column in columns:
        dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def decode_image(record: dict) -> Image.Image:
    """A PIL image from an undecoded `Image` feature value ({"bytes": ..., "path": ...}), fully loaded."""
    image = Image.open(io.BytesIO(record["bytes"]) if record.get("bytes") else record["path"])
    image.load()
    return image


class Augmentation:
    """Training augmentation as in Segmenter/Mask2Former: random scale, random crop, horizontal flip and
    photometric jitter. Labels follow with nearest resampling; pixels outside the image after padding get
    `ignore_index` (or 0 in instance maps).

    Args:
        crop_size: (height, width) of the crops (multiples of the model's input stride).
        base_short_side: the image's shorter side is resized to this times a random factor in `scale_range`
            (None: the image's own size times the factor).
        scale_range: range of the random scale factor.
        jitter: whether to apply photometric jitter (brightness, contrast, saturation, hue; each with p=0.5).
    """

    def __init__(self, crop_size, base_short_side=None, scale_range=(0.5, 2.0), jitter=True, ignore_index=255):
        self.crop_size = tuple(crop_size)
        self.base_short_side = base_short_side
        self.scale_range = scale_range
        self.jitter = jitter
        self.ignore_index = ignore_index

    def __call__(self, image: Image.Image, label: np.ndarray, instance: np.ndarray | None, rng: random.Random):
        scale = rng.uniform(*self.scale_range)
        short = self.base_short_side or min(image.size)
        factor = scale * short / min(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(size, Image.BILINEAR)
        maps = [(label, self.ignore_index)] + ([(instance, 0)] if instance is not None else [])
        maps = [(np.asarray(Image.fromarray(m).resize(size, Image.NEAREST)), fill) for m, fill in maps]

        crop_h, crop_w = self.crop_size
        top = rng.randint(0, max(0, size[1] - crop_h))
        left = rng.randint(0, max(0, size[0] - crop_w))
        flip = rng.random() < 0.5
        pixels = _crop(np.asarray(image), top, left, self.crop_size, 0)
        maps = [_crop(m, top, left, self.crop_size, fill) for m, fill in maps]
        if flip:
            pixels, maps = pixels[:, ::-1], [m[:, ::-1] for m in maps]
        image = Image.fromarray(np.ascontiguousarray(pixels))
        if self.jitter:
            image = photometric_jitter(image, rng)
        maps = [np.ascontiguousarray(m) for m in maps]
        return image, maps[0], (maps[1] if instance is not None else None)


def _crop(array: np.ndarray, top: int, left: int, size: tuple[int, int], fill) -> np.ndarray:
    """A (height, width) window of `array` at (top, left), padded with `fill` where the array is smaller."""
    window = array[top : top + size[0], left : left + size[1]]
    out = np.full(size + array.shape[2:], fill, dtype=array.dtype)
    out[: window.shape[0], : window.shape[1]] = window
    return out


def photometric_jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    """Mask2Former's colour jitter: brightness +-32/255, contrast and saturation x[0.5, 1.5], hue +-18 degrees,
    each applied with probability 0.5, in random order."""
    def brightness(img):
        shift = rng.uniform(-32, 32)
        return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + shift, 0, 255).astype(np.uint8))

    def hue(img):
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(rng.uniform(-18, 18) * 256 / 360)) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")

    ops = [
        brightness,
        lambda img: ImageEnhance.Contrast(img).enhance(rng.uniform(0.5, 1.5)),
        lambda img: ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.5)),
        hue,
    ]
    rng.shuffle(ops)
    for op in ops:
        if rng.random() < 0.5:
            image = op(image)
    return image


class SampleDecoder:
    """Turns a raw record into a training sample {"id", "image" (PIL RGB), "label" (H, W) uint8, "instance"
    (H, W) or None}, optionally augmented; returns None (and counts it) for a sample that cannot be read."""

    def __init__(self, image_column="image", label_column="label", instance_column=None, id_column=None,
                 augmentation: Augmentation | None = None):
        self.image_column, self.label_column = image_column, label_column
        self.instance_column, self.id_column = instance_column, id_column
        self.augmentation = augmentation
        self.skipped = 0

    def __call__(self, record: dict, rng: random.Random | None = None) -> dict | None:
        try:
            image = decode_image(record[self.image_column]).convert("RGB")
            label = np.asarray(decode_image(record[self.label_column]))
            instance = np.asarray(decode_image(record[self.instance_column])) if self.instance_column else None
            if label.ndim != 2 or label.shape != (image.height, image.width):
                raise ValueError(f"label map {label.shape} does not match image {image.height}x{image.width}")
        except DECODE_ERRORS as error:
            self.skipped += 1
            name = record.get(self.id_column) if self.id_column else None
            logger.warning("skipping unreadable sample %s (%s); %d skipped so far", name, error, self.skipped)
            return None
        if self.augmentation is not None:
            image, label, instance = self.augmentation(image, label, instance, rng)
        sample_id = record.get(self.id_column) if self.id_column else None
        return {"id": sample_id, "image": image, "label": label, "instance": instance}


class TrainStream:
    """An endless, shuffled, augmented stream of one process's training samples, resumable exactly.

    Pass after pass (epochs) over this process's part of `dataset` (`split_dataset_by_node`), shuffled with a
    buffer (`datasets`' shard-order plus buffer shuffle, reseeded per epoch). `state_dict()` is (epoch,
    position in the pass, skipped count); `load_state_dict` makes the next iteration continue right after the
    last sample handed out, replaying the pass's raw records without decoding them. Augmentation is seeded by
    (seed, rank, epoch, position), so a resumed run also draws the same crops.
    """

    def __init__(self, dataset, decoder: SampleDecoder, seed: int = 0, buffer_size: int = 256,
                 rank: int = 0, world_size: int = 1):
        if not isinstance(dataset, IterableDataset):
            dataset = dataset.to_iterable_dataset(num_shards=max(world_size, min(len(dataset), 64)))
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size).shuffle(
            seed=seed, buffer_size=buffer_size
        )
        self.decoder = decoder
        self.seed, self.rank = seed, rank
        self.epoch = 0
        self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "skipped": self.decoder.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.decoder.skipped = state["epoch"], state["position"], state["skipped"]

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.dataset.set_epoch(self.epoch)
            records = iter(self.dataset)
            try:
                for _ in range(self.position):  # replay to the saved position: raw records, nothing decoded
                    next(records)
                usable = self.position > 0
                for record in records:
                    rng = random.Random(hash((self.seed, self.rank, self.epoch, self.position)))
                    self.position += 1
                    sample = self.decoder(record, rng)
                    if sample is not None:
                        usable = True
                        yield sample
            finally:
                records.close()  # stop the reader's threads now, not whenever the generator is collected
            if not usable:
                raise ValueError(
                    f"the training data has no usable samples (process {self.rank}: a whole pass gave none, "
                    f"{self.decoder.skipped} unreadable)"
                )
            self.epoch += 1
            self.position = 0


def batches(samples, batch_size: int) -> Iterator[list[dict]]:
    """Consecutive lists of `batch_size` samples (the last, shorter one included)."""
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


TARGETS = ("labels", "class_masks", "instance_masks")


def collate(samples: list[dict], processor, targets: str = "labels") -> dict:
    """Model inputs for a list of samples, through the model's image processor (rescale, normalise, pad) and the
    sample ids. `targets`: "labels" (semantic models), "class_masks" (query models on semantic data: one mask per
    class present) or "instance_masks" (query models for instance/panoptic segmentation: one mask per instance
    of the samples' instance maps, whose class is the label map's majority class over the instance)."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    kwargs = dict(images=[np.asarray(sample["image"]) for sample in samples], do_resize=False, return_tensors="pt")
    if targets == "instance_masks":
        kwargs["segmentation_maps"] = [sample["instance"] for sample in samples]
        kwargs["instance_id_to_semantic_id"] = [
            instance_classes(sample["instance"], sample["label"], processor.ignore_index) for sample in samples
        ]
    else:
        kwargs["segmentation_maps"] = [sample["label"] for sample in samples]
        kwargs["return_mask_labels"] = targets == "class_masks"
    inputs = dict(processor(**kwargs))
    inputs.pop("pixel_mask")
    return inputs


def instance_classes(instance: np.ndarray, label: np.ndarray, ignore_index: int) -> dict[int, int]:
    """The class of every instance id of an instance map (0 = no instance -> ignore): the most frequent class
    of the label map over it."""
    mapping = {0: ignore_index}
    for instance_id in np.unique(instance):
        if instance_id:
            classes, counts = np.unique(label[instance == instance_id], return_counts=True)
            mapping[int(instance_id)] = int(classes[counts.argmax()])
    return mapping


def eval_samples(dataset, decoder: SampleDecoder, rank: int = 0, world_size: int = 1,
                 limit: int | None = None) -> Iterator[dict]:
    """The decoded, unaugmented samples of an evaluation split for one process (every world_size-th one)."""
    count = 0
    for index, record in enumerate(dataset):
        if limit is not None and index >= limit:
            break
        if index % world_size != rank:
            continue
        sample = decoder(record)
        if sample is not None:
            count += 1
            yield sample
    if count == 0 and rank == 0:
        raise ValueError(f"the evaluation data has no usable samples ({decoder.skipped} unreadable)")
