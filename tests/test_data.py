"""Training data: prepared folders load through one `load_dataset` path, augmentation keeps images and labels
aligned, unreadable samples are skipped and counted, and the training stream splits between processes and resumes
exactly."""

import itertools
import json
import random
import time

import datasets
import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image

import native_seg_hf as ns
from native_seg_hf.training.data import (
    Augmentation,
    SampleDecoder,
    TrainStream,
    collate,
    eval_samples,
    load_id2label,
    load_split,
)
from native_seg_hf.training.prepare import write_dataset
from segmentation_datasets import COLORS, ID2LABEL, camvid_dataset, synthetic_dataset, synthetic_rows


@pytest.fixture(autouse=True)
def no_parquet_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s whenever a Parquet stream's iteration ends (a guard for apache/arrow#45214), at every
    pass over these tiny sets; the tests skip it."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def test_camvid_folder_loads_like_a_hub_dataset(tmp_path):
    folder = camvid_dataset(tmp_path / "camvid", max_images=2)
    assert load_id2label(folder)[0] == "sky" and len(load_id2label(folder)) == 11
    splits = load_dataset(str(folder))  # the Hub-repo layout: splits found from the data files
    assert set(splits) == {"train", "validation"}
    record = next(iter(load_split(folder, "train", ["image", "label"], streaming=True)))
    sample = SampleDecoder(id_column="id")(record)
    assert sample["image"].size == (480, 360) and sample["label"].shape == (360, 480)
    assert set(np.unique(sample["label"])) <= set(range(11)) | {255}  # void (11) became 255


def test_missing_column_names_the_columns(tmp_path):
    folder = synthetic_dataset(tmp_path / "d")
    with pytest.raises(ValueError, match=r"no column\(s\) \['mask'\].*--label_column"):
        load_split(folder, "train", ["image", "mask"])


def test_augmentation_keeps_image_and_label_aligned():
    row = synthetic_rows(1, size=(90, 120))[0]
    decoder = SampleDecoder(augmentation=Augmentation((64, 96), scale_range=(0.4, 1.6), jitter=False))
    for seed in range(8):
        sample = decoder(row, random.Random(seed))
        pixels, label = np.asarray(sample["image"]).astype(int), sample["label"]
        assert pixels.shape == (64, 96, 3) and label.shape == (64, 96)
        assert set(np.unique(label)) <= {0, 1, 2, 255}  # nearest resampling invents no class
        labelled = label != 255
        inside = labelled & (pixels.sum(-1) > 0)  # padding is black and ignored
        expected = COLORS[label[inside]].astype(int)
        # colours match their class away from class borders (bilinear image vs nearest labels)
        assert (np.abs(pixels[inside] - expected).max(-1) < 40).mean() > 0.9
        assert not (pixels.sum(-1) == 0)[labelled].any()


def test_photometric_jitter_changes_colours_only():
    row = synthetic_rows(1)[0]
    plain = SampleDecoder(augmentation=Augmentation((64, 96), scale_range=(1, 1), jitter=False))(row, random.Random(3))
    jittered = SampleDecoder(augmentation=Augmentation((64, 96), scale_range=(1, 1)))(row, random.Random(3))
    assert np.array_equal(plain["label"], jittered["label"])
    assert not np.array_equal(np.asarray(plain["image"]), np.asarray(jittered["image"]))


def test_collate_builds_the_inputs_of_each_model_kind():
    samples = [SampleDecoder()(row) for row in synthetic_rows(2)]
    processor = ns.SeNaTraImageProcessor(num_labels=3)
    semantic = collate(samples, processor, "labels")
    assert semantic["pixel_values"].shape == (2, 3, 64, 96) and semantic["labels"].shape == (2, 64, 96)
    assert semantic["labels"][0, 0, 0] == 255
    query = collate(samples, processor, "class_masks")
    assert [c.tolist() for c in query["class_labels"]] == [[0, 1, 2], [0, 1, 2]]
    assert query["mask_labels"][0].shape == (3, 64, 96)
    for sample in samples:  # two instances of class 1 in a band split in halves
        sample["instance"] = np.where(sample["label"] == 1, 1 + (np.arange(64)[:, None] >= 32), 0).astype(np.uint8)
    instances = collate(samples, processor, "instance_masks")
    assert [c.tolist() for c in instances["class_labels"]] == [[1, 1], [1, 1]]


def test_unreadable_samples_are_skipped_and_counted(tmp_path):
    rows = synthetic_rows(6)
    rows[2]["image"] = {"bytes": b"not an image", "path": None}
    rows[4]["label"] = {"bytes": rows[4]["label"]["bytes"][:40], "path": None}  # truncated PNG
    write_dataset({"train": rows}, ID2LABEL, tmp_path / "d", "# d\n", num_shards=1)
    decoder = SampleDecoder(id_column="id")
    stream = TrainStream(load_split(tmp_path / "d", "train", ["image", "label"]), decoder, buffer_size=1)
    samples = iter(stream)
    ids = [next(samples)["id"] for _ in range(4)]
    samples.close()
    assert sorted(ids) == ["s000", "s001", "s003", "s005"]
    assert decoder.skipped == 2


def test_a_dataset_without_usable_samples_fails_clearly(tmp_path):
    rows = synthetic_rows(2)
    for row in rows:
        row["image"] = {"bytes": b"broken", "path": None}
    write_dataset({"train": rows, "validation": rows}, ID2LABEL, tmp_path / "d", "# d\n", num_shards=1)
    stream = TrainStream(load_split(tmp_path / "d", "train", ["image", "label"]), SampleDecoder())
    with pytest.raises(ValueError, match="no usable samples"):
        next(iter(stream))
    with pytest.raises(ValueError, match="no usable samples"):
        list(eval_samples(load_split(tmp_path / "d", "validation", ["image", "label"]), SampleDecoder()))


@pytest.mark.parametrize("streaming", [True, False])
def test_processes_get_disjoint_samples_and_resume_exactly(tmp_path, streaming):
    folder = synthetic_dataset(tmp_path / "d", train=12, num_shards=2)
    dataset = load_split(folder, "train", ["image", "label"], streaming=streaming)

    def stream(rank):
        return TrainStream(dataset, SampleDecoder(id_column="id"), seed=5, buffer_size=4, rank=rank, world_size=2)

    passes = {}
    for rank in (0, 1):
        uninterrupted = [s["id"] for s in itertools.islice(stream(rank), 12)]  # two passes of 6
        first = stream(rank)
        head = [s["id"] for s in itertools.islice(first, 4)]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = stream(rank)
        resumed.load_state_dict(state)
        tail = [s["id"] for s in itertools.islice(resumed, 8)]
        assert head + tail == uninterrupted  # same samples, same order, across the epoch boundary too
        assert uninterrupted[:6] != uninterrupted[6:]  # reshuffled each epoch
        passes[rank] = [set(uninterrupted[:6]), set(uninterrupted[6:])]
    for epoch in (0, 1):  # in each epoch the processes share the data out: disjoint, complete
        assert passes[0][epoch].isdisjoint(passes[1][epoch]) and len(passes[0][epoch] | passes[1][epoch]) == 12


def test_augmentation_is_replayed_on_resume(tmp_path):
    folder = synthetic_dataset(tmp_path / "d", train=6, num_shards=1)
    dataset = load_split(folder, "train", ["image", "label"])

    def stream():
        return TrainStream(dataset, SampleDecoder(augmentation=Augmentation((32, 32))), buffer_size=2)

    full = [np.asarray(s["image"]) for s in itertools.islice(stream(), 5)]
    first = stream()
    list(itertools.islice(first, 3))
    resumed = stream()
    resumed.load_state_dict(first.state_dict())
    assert all(np.array_equal(a, np.asarray(b["image"])) for a, b in zip(full[3:], itertools.islice(resumed, 2)))


def test_decode_image_reads_paths_too(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(path)
    record = {"image": {"bytes": None, "path": str(path)}, "label": {"bytes": None, "path": str(path)}}
    sample = SampleDecoder()(record)
    assert sample["image"].mode == "RGB" and sample["label"].shape == (4, 4)
    assert SampleDecoder()({"image": {"bytes": b"", "path": str(tmp_path / "missing.png")}, "label": record["label"]}) is None


@pytest.mark.parametrize("world_size", [1, 2])
def test_workers_split_the_shards_and_resume_exactly(tmp_path, world_size):
    """Two DataLoader workers per process: each pass hands out every sample of the processes exactly once, a stream
    resumed from any sample's state continues with the same samples (across pass boundaries, with the workers'
    turns resumed mid-round), and another worker count is refused."""
    folder = synthetic_dataset(tmp_path / "d", train=8 * world_size, num_shards=4 * world_size)
    dataset = load_split(folder, "train", ["image", "label"])

    def stream(rank, num_workers=2):
        return TrainStream(dataset, SampleDecoder(id_column="id", augmentation=Augmentation((16, 16))), seed=3,
                           buffer_size=4, rank=rank, world_size=world_size, num_workers=num_workers)

    passes = []
    for rank in range(world_size):
        full = stream(rank)
        samples = list(itertools.islice(full, 19))  # two passes of 8 and 3 more
        ids = [s["id"] for s in samples]
        # datasets shares a stream's epoch between forked processes: had the workers not each their own, their
        # passes would race on it (and reshuffle at random), and the training process would see their epoch
        assert full.dataset.epoch == 0
        assert len(set(ids[:8])) == len(set(ids[8:16])) == 8 and ids[:8] != ids[8:16]
        passes.append([set(ids[:8]), set(ids[8:16])])
        for head in (3, 8, 11):  # mid-round, at the pass boundary, in the second pass
            first = stream(rank)
            list(itertools.islice(first, head))
            state = json.loads(json.dumps(first.state_dict()))
            resumed = stream(rank)
            resumed.load_state_dict(state)
            tail = list(itertools.islice(resumed, 19 - head))
            assert [s["id"] for s in tail] == ids[head:]
            assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(tail, samples[head:]))
        with pytest.raises(ValueError, match="saved with 2 data loader workers and this run has 0"):
            stream(rank, num_workers=0).load_state_dict(state)
    for epoch in (0, 1):  # in each pass the processes share the samples out
        assert len(set().union(*(rank[epoch] for rank in passes))) == 8 * world_size


def test_workers_skip_and_count_unreadable_samples(tmp_path):
    """One shard per worker, the first with an unreadable sample: the workers take turns, each through its own
    shard's samples, pass after pass."""
    rows = synthetic_rows(6)
    rows[2]["image"] = {"bytes": b"not an image", "path": None}
    write_dataset({"train": rows}, ID2LABEL, tmp_path / "d", "# d\n", num_shards=2)
    decoder = SampleDecoder(id_column="id")
    stream = TrainStream(load_split(tmp_path / "d", "train", ["image", "label"]), decoder, buffer_size=1,
                         num_workers=2)
    ids = [s["id"] for s in itertools.islice(stream, 6)]
    assert ids == ["s000", "s003", "s001", "s004", "s000", "s005"] and decoder.skipped == 1
    assert stream.state_dict()["skipped"] == 1


def test_read_ahead_hides_the_pause_at_the_end_of_each_pass(tmp_path, monkeypatch):
    """datasets pauses a Parquet stream when its files are exhausted (5 s by default; 0.6 s here): read in the
    consuming thread, the pause stalls the consumer; read ahead, it does not."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.6)
    folder = synthetic_dataset(tmp_path / "d", train=6, num_shards=1, size=(16, 32))
    dataset = load_split(folder, "train", ["image", "label"])

    def longest_wait(read_ahead):
        samples = iter(TrainStream(dataset, SampleDecoder(), buffer_size=2, read_ahead=read_ahead))
        next(samples)
        waits = []
        for _ in range(14):  # into the third pass
            time.sleep(0.1)  # a training step
            start = time.perf_counter()
            next(samples)
            waits.append(time.perf_counter() - start)
        samples.close()
        return max(waits)

    assert longest_wait(read_ahead=0) > 0.5
    assert longest_wait(read_ahead=16) < 0.3


def test_rewriting_a_dataset_folder_with_fewer_shards_leaves_no_stale_rows(tmp_path):
    synthetic_dataset(tmp_path / "d", train=8, num_shards=4)
    synthetic_dataset(tmp_path / "d", train=3, num_shards=1)
    assert sorted(p.name for p in (tmp_path / "d" / "data").glob("train-*")) == ["train-00000-of-00001.parquet"]
    assert len(list(load_dataset(str(tmp_path / "d"), split="train", streaming=True))) == 3
