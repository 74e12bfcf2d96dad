"""Convert the raw segmentation sets of ../shared/data into `datasets` folders (Parquet shards + id2label.json).

    python scripts/prepare_data.py [NAME ...] [--raw ../shared/data] [--out ~/.cache/native_seg_hf/data]

NAMEs: camvid, weizmann_horse, ade20k_sample, coco_panoptic_sample, bsds500 (default: every one present). Each
becomes OUT/NAME, which `datasets.load_dataset(OUT/NAME)` and `scripts/train.py --dataset OUT/NAME` read offline, like
a Hub dataset id online. The output lies outside the repository: the data's terms do not allow copying it in.
It says what it prepares, decodes every sample once and leaves out (and names) those that do not decode.
"""

import argparse
import logging
from pathlib import Path

from native_seg_hf.training.prepare import DATASETS, prepare

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path.home() / ".cache" / "native_seg_hf" / "data"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", choices=[[]] + list(DATASETS), metavar="NAME")
    parser.add_argument("--raw", type=Path, default=ROOT.parent / "shared" / "data", help="folder of the raw sets")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the datasets are written")
    parser.add_argument("--num_shards", type=int, default=4, help="Parquet shards of each train split")
    args = parser.parse_args()

    names = args.names or [name for name in DATASETS if (args.raw / name).is_dir()]
    if not names:
        parser.error(f"no raw data set found in {args.raw}")
    # The library reports each set, split and dropped sample through logging; show it here.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("native_seg_hf")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    for name in names:
        folder = prepare(name, args.raw, args.out, args.num_shards)
        print(f"{name} -> {folder}")


if __name__ == "__main__":
    main()
