"""Training input pipeline, before and after: the main job's training steps fed by the stream read and decoded in the
training process (as before: `num_workers=0`, no read-ahead) and by DataLoader workers with read-ahead (now).

    python scripts/benchmark_input.py [--dataset FOLDER] [--steps 50] [--rounds 2] [--num_workers N]
                                      [--out results/input_pipeline.json]

The main job's recipe (`scripts/main_job.py`): SeNaTra-Nano, semantic head, 128x160 crops of the half-size CamVid
images, batch 8, AdamW. Each round runs both settings one after the other in this one process (before, after,
before, after, ...), each from a fresh stream and the same initial weights, so that a change of the machine's load
hits both. Per setting it records images/s over the steps after the first (which includes the workers' start) and
every wait for a batch: the longest is the stall, e.g. `datasets`' pause when a pass's Parquet files are exhausted.
The machine's load average is recorded before and after each run.
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from native_seg_hf import SeNaTraConfig, SeNaTraForSemanticSegmentation
from native_seg_hf.training.data import Augmentation, SampleDecoder, TrainStream, batches, load_id2label, load_split
from native_seg_hf.training.loop import TrainArguments, image_processor, train_step
from native_seg_hf.training.optim import create_optimizer

ROOT = Path(__file__).resolve().parent.parent
PREPARED = Path.home() / ".cache" / "native_seg_hf" / "data" / "camvid"  # where main_job.py prepares CamVid
SHARED_DATA = ROOT.parent / "shared" / "data"


def camvid_folder(folder: Path | None) -> Path:
    """The given folder, the main job's prepared CamVid, or CamVid prepared into a temporary folder."""
    if folder is not None:
        return folder
    if (PREPARED / "id2label.json").is_file():
        return PREPARED
    from native_seg_hf.training.prepare import prepare

    target = Path(tempfile.mkdtemp())
    prepare("camvid", SHARED_DATA, target)
    return target / "camvid"


def run(dataset: Path, id2label: dict, num_workers: int, read_ahead: int, steps: int, accelerator) -> dict:
    """`steps` training steps of the main job's recipe from a fresh stream; the wait for every batch."""
    args = TrainArguments(dataset=str(dataset), crop_height=128, crop_width=160, base_short_side=180,
                          per_device_batch_size=8, learning_rate=4e-4)
    torch.manual_seed(0)
    model = SeNaTraForSemanticSegmentation(SeNaTraConfig.from_preset("nano", id2label=id2label))
    processor = image_processor(model, args)
    optimizer = create_optimizer(model, args.learning_rate, args.weight_decay, args.layer_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    augmentation = Augmentation((args.crop_height, args.crop_width), args.base_short_side,
                                (args.scale_min, args.scale_max), args.jitter, processor.ignore_index)
    stream = TrainStream(load_split(dataset, "train", ["image", "label"]), SampleDecoder(augmentation=augmentation),
                         args.seed, args.shuffle_buffer, num_workers=num_workers, read_ahead=read_ahead)
    load_before = os.getloadavg()
    micro_batches = batches(stream, args.per_device_batch_size)
    waits, images = [], 0
    start = time.perf_counter()
    for step in range(steps):
        if step == 1:  # the first batch includes starting the workers: timed apart
            start = time.perf_counter()
        wait = time.perf_counter()
        samples = next(micro_batches)
        waits.append(time.perf_counter() - wait)
        train_step(model, [samples], processor, accelerator, "labels")
        optimizer.step()
        optimizer.zero_grad()
        images += len(samples) if step else 0
    seconds = time.perf_counter() - start
    micro_batches.close()
    longest = max(range(1, steps), key=lambda i: waits[i])
    return {
        "num_workers": stream.num_workers, "read_ahead": read_ahead, "steps": steps,
        "images_per_second": images / seconds, "seconds": seconds, "first_batch_seconds": waits[0],
        "longest_stall_seconds": waits[longest], "longest_stall_step": longest + 1,
        "stalls_over_half_a_second": sum(wait > 0.5 for wait in waits[1:]),
        "data_wait_seconds": sum(waits[1:]), "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def summarize(rounds: list[dict]) -> dict:
    """Median images/s and the longest stall of each setting over the rounds; after/before per round (a round's
    two runs see about the same load)."""
    summary = {name: {"images_per_second_median": statistics.median(r[name]["images_per_second"] for r in rounds),
                      "longest_stall_seconds": max(r[name]["longest_stall_seconds"] for r in rounds)}
               for name in rounds[0]}
    summary["speedup_per_round"] = [r["after"]["images_per_second"] / r["before"]["images_per_second"] for r in rounds]
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="a prepared CamVid folder (default: the main job's)")
    parser.add_argument("--steps", type=int, default=50, help="steps per run (8 images each; a pass is 367 images)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=TrainArguments.num_workers, help="workers of 'after'")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "input_pipeline.json")
    cli = parser.parse_args()
    dataset = camvid_folder(cli.dataset)
    id2label = load_id2label(dataset)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    settings = {"before": dict(num_workers=0, read_ahead=0), "after": dict(num_workers=cli.num_workers, read_ahead=256)}
    rounds = []
    for index in range(cli.rounds):
        record = {}
        for name, setting in settings.items():
            record[name] = run(dataset, id2label, **setting, steps=cli.steps, accelerator=accelerator)
            print(f"round {index + 1} {name}: {record[name]['images_per_second']:.2f} img/s, longest stall "
                  f"{record[name]['longest_stall_seconds']:.2f} s (load {record[name]['load_average_before'][0]:.1f})",
                  flush=True)
        rounds.append(record)
    summary = summarize(rounds)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "command": "python scripts/benchmark_input.py " + " ".join(
            f"--{k} {v}" for k, v in vars(cli).items() if k != "out" and v is not None),
        "commit": commit, "dataset": str(dataset), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "device": str(accelerator.device),
        "recipe": "main job: SeNaTra-Nano semantic, 128x160 crops, base short side 180, batch 8, AdamW 4e-4",
        "settings": settings, "rounds": rounds, "summary": summary,
    }
    cli.out.parent.mkdir(parents=True, exist_ok=True)
    cli.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
