"""Small `datasets` folders for the training tests, written the way scripts/prepare_data.py writes real ones."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

from native_seg_hf.training.prepare import png_bytes, prepare_camvid_files, write_dataset

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "camvid_0016E5_07959"
SHARED_CAMVID = ROOT.parent / "shared" / "data" / "camvid"
COLORS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)
ID2LABEL = {0: "red", 1: "green", 2: "blue"}


def synthetic_rows(count: int, size=(64, 96), seed: int = 0, prefix: str = "s") -> list[dict]:
    """Images whose pixel colour is their class (three classes in vertical bands of random widths, a void corner)."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        cuts = np.sort(rng.integers(8, size[1] - 8, 2))
        label = np.zeros(size, dtype=np.uint8)
        label[:, cuts[0]:] = 1
        label[:, cuts[1]:] = 2
        image = COLORS[label]
        label[:4, :4] = 255
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        rows.append({"id": f"{prefix}{index:03d}", "image": {"bytes": buffer.getvalue(), "path": None},
                     "label": png_bytes(label)})
    return rows


def synthetic_dataset(folder: Path, train: int = 12, validation: int = 4, num_shards: int = 2, **kwargs) -> Path:
    splits = {"train": synthetic_rows(train, **kwargs), "validation": synthetic_rows(validation, seed=1, prefix="v")}
    write_dataset(splits, ID2LABEL, folder, "# synthetic\n\nTerms: test data.\n", num_shards)
    return folder


def fixture_pairs(folder: Path, count: int) -> list[tuple[Path, Path]]:
    """`count` (at most 8) distinct (image, label) files from the one bundled CamVid fixture: it, then its mirror
    images and rotations (tests that ask for n images must get n, with or without ../shared/data)."""
    pairs = [(FIXTURE.with_suffix(".jpg"), FIXTURE.with_suffix(".png"))]
    folder.mkdir(parents=True, exist_ok=True)
    T = Image.Transpose
    flips = [T.FLIP_LEFT_RIGHT, T.FLIP_TOP_BOTTOM, T.ROTATE_180, T.TRANSPOSE, T.TRANSVERSE, T.ROTATE_90, T.ROTATE_270]
    for flip in flips[: count - 1]:
        mirrored = folder / f"{FIXTURE.name}_{flip.name.lower()}"
        for source, suffix in zip(pairs[0], (".jpg", ".png")):
            Image.open(source).transpose(flip).save(mirrored.with_suffix(suffix))
        pairs.append((mirrored.with_suffix(".jpg"), mirrored.with_suffix(".png")))
    return pairs


def camvid_pairs(split: str, count: int, fixture_folder: Path) -> list[tuple[Path, Path]]:
    """`count` real CamVid (image, label) files of `split` ("train" or "validation"): from ../shared/data when
    there, else the bundled fixture and its mirror images (`fixture_pairs`, written into `fixture_folder`)."""
    source = {"train": "train", "validation": "val"}[split]
    images = sorted((SHARED_CAMVID / source / "images").glob("*.jpg"))[:count]
    pairs = [(image, image.parent.parent / "labels" / f"{image.stem}.png") for image in images]
    return pairs or fixture_pairs(fixture_folder, count)


def camvid_dataset(folder: Path, max_images: int = 4) -> Path:
    """`max_images` real CamVid images per split (from ../shared/data when present, else the bundled fixture and its
    mirrors) as a prepared folder."""
    pairs = {split: camvid_pairs(split, max_images, folder.parent / f"{folder.name}_fixture_{split}")
             for split in ("train", "validation")}
    return prepare_camvid_files(pairs, folder)
