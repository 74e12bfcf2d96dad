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
or batch dispatching would split the already split stream a second time. Within a process, `TrainStream` can
decode in `torch.utils.data.DataLoader` workers, among which `datasets` deals out that process's shards.

Exact resume: `datasets`' `IterableDataset.state_dict()` drops the content of the shuffle buffer (its
`load_state_dict` warns that the buffer is refilled), which loses up to `buffer_size` samples of the pass. The
shuffle is deterministic in (seed, epoch), so `TrainStream` saves (epoch, position) instead and, on resume, replays
the pass's undecoded records up to `position`: every sample of the current pass is seen exactly once.
"""

import copy
import hashlib
import io
import json
import logging
import math
import queue
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
from datasets import Image as ImageFeature
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from huggingface_hub import hf_hub_download
import torch
from PIL import Image, ImageEnhance, UnidentifiedImageError
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import IterableDataset as TorchIterableDataset

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


CLASS_WEIGHTINGS = ("enet",)


def class_weights(labels, num_labels: int, method: str | None) -> list[float] | None:
    """Per-class weights for the semantic loss from label maps (an iterable of (H, W) int arrays, ignore index and
    other out-of-range values not counted), or None when `method` is None.

    "enet": 1 / ln(1.02 + p_c), p_c the class's share of the labelled pixels (ENet's weighting for CamVid):
    between about 1.4 for a class covering everything and 50 for an absent one; milder than SegNet's
    median-frequency balancing (13x between CamVid's commonest and rarest class, against about 70x)."""
    if method is None:
        return None
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(f"class_weighting must be None or one of {CLASS_WEIGHTINGS}, got {method!r}")
    counts = np.zeros(num_labels, dtype=np.float64)
    for label in labels:
        label = np.asarray(label)
        counts += np.bincount(label[(label >= 0) & (label < num_labels)].ravel(), minlength=num_labels)
    return (1.0 / np.log(1.02 + counts / max(counts.sum(), 1.0))).tolist()


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

    Workers (`num_workers` > 0): decoding and augmentation run in `torch.utils.data.DataLoader` worker processes.
    Inside a worker `datasets` gives each worker its own shards of the process's part (whole shards, so at most
    as many workers as the process has shards work), and every worker runs the stream above over them, with
    augmentation also seeded by the worker's index. The DataLoader hands out one sample of each worker in turn,
    so the order is fixed by (seed, number of workers); the state is then every worker's (epoch, position,
    skipped) plus which worker comes next, and a resumed stream first lets the workers before that one hand out
    a placeholder, which is dropped: the same samples in the same order, none lost or repeated. Resuming with
    another number of workers is refused (it would deal the shards out differently).

    Read-ahead: the raw records are read by a background thread, up to `read_ahead` ahead of decoding, and it
    goes on into the next pass while the current one is decoded. `datasets` pauses a Parquet stream for
    `datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN` (5 s) each time a pass's files are exhausted (a guard for
    apache/arrow#45214); the thread takes that pause while decoding goes on from the records already read.
    `read_ahead=0` reads in the consuming thread (every pause then stalls training).
    """

    def __init__(self, dataset, decoder: SampleDecoder, seed: int = 0, buffer_size: int = 256,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, read_ahead: int = 256):
        if not isinstance(dataset, IterableDataset):
            dataset = dataset.to_iterable_dataset(num_shards=max(world_size, min(len(dataset), 64)))
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size).shuffle(
            seed=seed, buffer_size=buffer_size
        )
        self.decoder = decoder
        self.seed, self.rank = seed, rank
        self.read_ahead = read_ahead
        # datasets stops the workers beyond the process's number of shards: they would never hand out a sample
        self.num_workers = min(num_workers, node_shards(dataset, world_size))
        if self.num_workers < num_workers:
            logger.warning("%d data loader workers asked, %d used: each worker reads whole shards and this process "
                           "has %d", num_workers, self.num_workers, node_shards(dataset, world_size))
        self.epoch = 0
        self.position = 0
        self.workers = [{"epoch": 0, "position": 0, "skipped": 0} for _ in range(self.num_workers)]
        self.next_worker = 0

    def state_dict(self) -> dict:
        if not self.num_workers:
            return {"epoch": self.epoch, "position": self.position, "skipped": self.decoder.skipped}
        return {"workers": [dict(worker) for worker in self.workers], "next_worker": self.next_worker,
                "skipped": self.decoder.skipped}

    def load_state_dict(self, state: dict) -> None:
        saved_workers = len(state.get("workers", []))
        if saved_workers != self.num_workers:
            raise ValueError(
                f"this stream position was saved with {saved_workers} data loader workers and this run has "
                f"{self.num_workers}: the workers deal out the shards and take turns, so resume with "
                f"--num_workers {saved_workers}"
            )
        if self.num_workers:
            self.workers, self.next_worker = [dict(worker) for worker in state["workers"]], state["next_worker"]
        else:
            self.epoch, self.position = state["epoch"], state["position"]
        self.decoder.skipped = state["skipped"]

    def __iter__(self) -> Iterator[dict]:
        if not self.num_workers:
            for sample, (self.epoch, self.position, _) in self._samples(self.epoch, self.position, worker=None):
                yield sample
            return
        start = [dict(worker) for worker in self.workers]
        skipped = self.decoder.skipped - sum(worker["skipped"] for worker in start)  # counted before the workers
        loader = DataLoader(_WorkerStream(self, start, self.next_worker), batch_size=None, num_workers=self.num_workers,
                            collate_fn=_keep, prefetch_factor=2)
        items = iter(loader)
        try:
            for index, item in enumerate(items):
                worker = index % self.num_workers
                if item is None:  # a placeholder of a worker before the saved next one
                    continue
                shared, (epoch, position, worker_skipped) = item
                sample = _from_tensors(shared)
                self.workers[worker] = {"epoch": epoch, "position": position, "skipped": worker_skipped}
                self.next_worker = (worker + 1) % self.num_workers
                self.decoder.skipped = skipped + sum(w["skipped"] for w in self.workers)
                yield sample
        finally:
            items._shutdown_workers()  # stop the workers now, not whenever the iterator is collected

    def _samples(self, epoch: int, position: int, worker: int | None):
        """(sample, (epoch, position, skipped) after it) pairs from (epoch, position) on, endlessly."""
        records = ReadAhead(self._records(epoch, position), self.read_ahead)
        try:
            usable = position > 0
            for epoch, position, record in records:
                if record is None:  # the end of a pass
                    if not usable:
                        raise ValueError(
                            f"the training data has no usable samples (process {self.rank}"
                            f"{'' if worker is None else f', data loader worker {worker}'}: a whole pass gave none, "
                            f"{self.decoder.skipped} unreadable)"
                        )
                    usable = False
                    continue
                key = (self.seed, self.rank, epoch, position) if worker is None else (
                    self.seed, self.rank, worker, epoch, position)
                sample = self.decoder(record, random.Random(hash(key)))
                if sample is not None:
                    usable = True
                    yield sample, (epoch, position + 1, self.decoder.skipped)
        finally:
            records.close()

    def _records(self, epoch: int, position: int):
        """(epoch, position, raw record) from (epoch, position) on, pass after pass; (epoch, None, None) ends a
        pass. Replaying to `position` reads raw records only, nothing is decoded."""
        while True:
            self.dataset.set_epoch(epoch)
            records = iter(self.dataset)
            try:
                for _ in range(position):
                    next(records)
                for record in records:
                    yield epoch, position, record
                    position += 1
            finally:
                records.close()  # stop the reader's threads now, not whenever the generator is collected
            yield epoch, None, None
            epoch, position = epoch + 1, 0


def node_shards(dataset, world_size: int) -> int:
    """How many shards one process reads: whole shards when their number divides the world size (see
    `split_dataset_by_node`), else every shard (each process keeps every world_size-th example)."""
    shards = dataset.num_shards
    return shards // world_size if shards % world_size == 0 else shards


class _WorkerStream(TorchIterableDataset):
    """What each DataLoader worker iterates: its part of the stream from its saved state. Workers before the
    saved next one first hand out a placeholder (None), so that the DataLoader's turns resume where they were."""

    def __init__(self, stream: TrainStream, start: list[dict], next_worker: int):
        self.stream, self.start, self.next_worker = stream, start, next_worker

    def __iter__(self):
        worker = get_worker_info().id
        state = self.start[worker]
        # datasets keeps a stream's epoch in shared memory (for persistent workers, which the training process
        # sets it for), so the workers' own set_epoch calls would race on one value: each gets a private copy.
        self.stream.dataset = copy.deepcopy(self.stream.dataset)
        self.stream.decoder.skipped = state["skipped"]
        if worker < self.next_worker:
            yield None
        for sample, position in self.stream._samples(state["epoch"], state["position"], worker):
            yield _to_tensors(sample), position


# Samples leave the workers with their images and maps as tensors: these travel through shared memory and the
# worker's pipe carries only their handles. Pickled whole they could fill the pipe, and a worker whose training
# process was killed would then never finish exiting.
def _to_tensors(sample: dict) -> dict:
    shared = {"_images": [key for key, value in sample.items() if isinstance(value, Image.Image)]}
    for key, value in sample.items():
        is_array = isinstance(value, (Image.Image, np.ndarray))
        shared[key] = torch.from_numpy(np.array(value)) if is_array else value
    return shared


def _from_tensors(shared: dict) -> dict:
    images = shared.pop("_images")
    return {key: (Image.fromarray(value.numpy()) if key in images else value.numpy())
            if isinstance(value, torch.Tensor) else value for key, value in shared.items()}


def _keep(item):
    """The DataLoader's collate function: samples stay as they are (PIL images, numpy maps)."""
    return item


class ReadAhead:
    """Iterates `iterator` in a background thread, up to `size` items ahead of the consumer (`size=0`: in the
    consumer's thread). Exceptions reach the consumer; `close()` stops the thread and closes the iterator."""

    _END = object()

    def __init__(self, iterator, size: int):
        self.iterator, self.size = iterator, size
        if size:
            self.queue = queue.Queue(maxsize=size)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._fill, daemon=True, name="read-ahead")
            self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self):
        try:
            for item in self.iterator:
                if not self._put((item, None)):
                    break
            else:
                self._put((self._END, None))
        except BaseException as error:  # handed to the consumer, raised there
            self._put((self._END, error))
        finally:
            self.iterator.close()

    def __iter__(self):
        if not self.size:
            yield from self.iterator
            return
        while True:
            item, error = self.queue.get()
            if error is not None:
                raise error
            if item is self._END:
                return
            yield item

    def close(self):
        if not self.size:
            self.iterator.close()
            return
        self.stop.set()
        self.thread.join()


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
