"""Training input pipeline, before and after: the main job's training steps fed by the stream read and decoded in the
training process (as before: `num_workers=0`, no read-ahead) and by DataLoader workers with read-ahead (now), each
with the torch threads the training loop gives it (`training_threads`: every core before; now the cores less one
per worker). Two more settings tell the parts apart: before with the threads of after (what moving the decoding
alone gains), and after with every core's thread as torch's default would give it (what the workers cost when the
step's threads and theirs outnumber the cores).

    python scripts/benchmark_input.py [--dataset FOLDER] [--steps 50] [--rounds 3] [--num_workers N] [--settings ...]
                                      [--out results/input_pipeline.json]

The main job's recipe (`scripts/main_job.py`): SeNaTra nano-s16, native semantic head, 128x160 crops of the
half-size CamVid images, batch 8, AdamW. Each round runs the settings (`--settings`, default all four) one after the
other in this one process, each from a fresh stream and the same initial weights, so that a change of the machine's
load hits all. Per setting it records images/s over the steps after the first (which includes the workers' start) and
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
from native_seg_hf.training.loop import TrainArguments, image_processor, train_step, training_threads
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


def run(dataset: Path, id2label: dict, num_workers: int, read_ahead: int, threads: int, steps: int,
        accelerator) -> dict:
    """`steps` training steps of the main job's recipe from a fresh stream, with `threads` torch threads; the wait
    for every batch."""
    torch.set_num_threads(threads)
    args = TrainArguments(dataset=str(dataset), crop_height=128, crop_width=160, base_short_side=180,
                          per_device_batch_size=8, learning_rate=4e-4)
    torch.manual_seed(0)
    model = SeNaTraForSemanticSegmentation(SeNaTraConfig.from_preset("nano-s16", id2label=id2label))
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
        "num_workers": stream.num_workers, "read_ahead": read_ahead, "torch_threads": threads, "steps": steps,
        "images_per_second": images / seconds, "seconds": seconds, "first_batch_seconds": waits[0],
        "longest_stall_seconds": waits[longest], "longest_stall_step": longest + 1,
        "stalls_over_half_a_second": sum(wait > 0.5 for wait in waits[1:]),
        "data_wait_seconds": sum(waits[1:]), "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


SETTINGS = ("before", "before_with_threads_of_after", "after", "after_with_a_thread_per_core")


def summarize(rounds: list[dict]) -> dict:
    """Median images/s and the longest stall of each setting over the rounds; after's images/s over each other
    setting's, per round (a round's runs see about the same load) and their median."""
    summary = {name: {"images_per_second_median": statistics.median(r[name]["images_per_second"] for r in rounds),
                      "longest_stall_seconds": max(r[name]["longest_stall_seconds"] for r in rounds)}
               for name in rounds[0]}
    for name in rounds[0]:
        if name != "after" and "after" in rounds[0]:
            ratios = [r["after"]["images_per_second"] / r[name]["images_per_second"] for r in rounds]
            summary[f"after_over_{name}"] = {"per_round": ratios, "median": statistics.median(ratios)}
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="a prepared CamVid folder (default: the main job's)")
    parser.add_argument("--steps", type=int, default=50, help="steps per run (8 images each; a pass is 367 images)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num_workers", type=int, default=TrainArguments.num_workers, help="workers of 'after'")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS), help="which to run, in "
                        "this order (on a loaded machine the thread-per-core ones can take minutes per step)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "input_pipeline.json")
    cli = parser.parse_args()
    # the code that runs: the commit at the start (the tree may move on during a long run)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dataset = camvid_folder(cli.dataset)
    id2label = load_id2label(dataset)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    cores = training_threads(num_workers=0)  # every core (or OMP_NUM_THREADS): torch's default, and the loop's before
    after_threads = training_threads(cli.num_workers)
    every = {
        "before": dict(num_workers=0, read_ahead=0, threads=cores),
        "before_with_threads_of_after": dict(num_workers=0, read_ahead=0, threads=after_threads),
        "after": dict(num_workers=cli.num_workers, read_ahead=256, threads=after_threads),
        "after_with_a_thread_per_core": dict(num_workers=cli.num_workers, read_ahead=256, threads=cores),
    }
    settings = {name: every[name] for name in cli.settings}
    load_before = os.getloadavg()
    rounds = []
    for index in range(cli.rounds):
        record = {}
        for name, setting in settings.items():
            record[name] = run(dataset, id2label, **setting, steps=cli.steps, accelerator=accelerator)
            print(f"round {index + 1} {name} ({setting['threads']} threads): "
                  f"{record[name]['images_per_second']:.2f} img/s, longest stall "
                  f"{record[name]['longest_stall_seconds']:.2f} s (load {record[name]['load_average_before'][0]:.1f})",
                  flush=True)
        rounds.append(record)
        # written after every round, so that an interrupted run keeps the rounds it finished
        summary = summarize(rounds)
        result = {
            "command": "python scripts/benchmark_input.py " + " ".join(
                f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(cli).items()
            if k != "out" and v is not None),
            "commit": commit, "dataset": str(dataset), "cpu_count": os.cpu_count(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                               if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None,
            "device": str(accelerator.device),
            "recipe": "main job: SeNaTra nano-s16 semantic, 128x160 crops, base short side 180, batch 8, AdamW 4e-4",
            "settings": settings, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "note": "a shared CPU: other jobs ran during the benchmark (load averages per run), so absolute images/s "
                    "are deflated; a round's settings ran one after the other, so compare them by round",
            "rounds": rounds, "summary": summary,
        }
        cli.out.parent.mkdir(parents=True, exist_ok=True)
        cli.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
