"""Training: layer-wise decay and schedule, the Accelerate loop for every model kind, kill -9 and exact resume,
two processes with `accelerate launch`, the published folder (remote code, model card with metrics), and
Trainer fine-tuning on real CamVid images with the loss scaled right under gradient accumulation."""

import io
import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import EomtConfig, EomtForUniversalSegmentation, Trainer, default_data_collator
from transformers import TrainingArguments as HfTrainingArguments

import native_seg_hf as ns
from native_seg_hf.training.data import Augmentation, class_weights, load_id2label, load_split
from native_seg_hf.training.hub import finish_run
from native_seg_hf.training import loop as training_loop
from native_seg_hf.training.loop import TrainArguments, evaluate_saved, train, training_threads
from native_seg_hf.training.optim import WeightAverage, create_optimizer, create_scheduler, layer_decay_groups
from native_seg_hf.training.trainer import MeanIoUMetrics, preprocess_logits_for_metrics, trainer_transform
from segmentation_datasets import ID2LABEL, camvid_dataset, synthetic_dataset, synthetic_rows

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 2], num_heads=[1, 2, 3, 4], attention_kernel_size=3,
            head_hidden_size=32, drop_path_rate=0.0)
@pytest.fixture(autouse=True)
def no_parquet_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s whenever a Parquet stream's iteration ends (a guard for apache/arrow#45214), at every
    pass over these tiny sets; in this process the tests skip it (subprocess runs keep it)."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}


def tiny_config_folder(folder: Path, **kwargs) -> str:
    ns.SeNaTraConfig(**TINY, **kwargs).save_pretrained(folder)
    return str(folder)


def run_args(tmp_path, dataset, **kwargs) -> TrainArguments:
    if "config" not in kwargs:
        kwargs["config"] = tiny_config_folder(tmp_path / "config")
    defaults = dict(dataset=str(dataset), output_dir=str(tmp_path / "run"), crop_height=32, crop_width=64, per_device_batch_size=2, max_steps=3, learning_rate=1e-3,
                    max_eval_samples=4, logging_steps=1, shuffle_buffer=4)
    return TrainArguments(**{**defaults, **kwargs})


def cli(args: TrainArguments) -> list[str]:
    """The command-line flags that give `args`."""
    flags = []
    for key, value in asdict(args).items():
        if value is not None:
            flags += [f"--{key}", str(value)]
    return flags


def test_layer_decay_follows_depth():
    model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY, num_labels=3))
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    # embeddings, 5 blocks + 3 grouping layers, then the head and final norm at the base lr
    assert [g["lr"] for g in groups] == [0.5**8, *[0.5**k for k in range(7, -1, -1)], 1.0]
    assert [g["is_backbone"] for g in groups] == [True] * 9 + [False]
    head = {id(p) for p in model.head.parameters()}
    assert head <= {id(p) for p in groups[-1]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    eomt = EomtForUniversalSegmentation(EomtConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                   intermediate_size=64, image_size=32, patch_size=8, num_labels=3))
    eomt_groups = layer_decay_groups(eomt, lr=1.0, weight_decay=0.0, layer_decay=0.8)
    assert len(eomt_groups) == 5 and {id(p) for p in eomt.query.parameters()} <= {id(p) for p in eomt_groups[-1]["params"]}
    segmenter = ns.SegmenterForSemanticSegmentation(ns.SegmenterConfig(backbone_config=ns.SeNaTraConfig(**TINY)))
    decoder = {id(p) for p in segmenter.decoder.parameters()}
    assert decoder <= {id(p) for p in layer_decay_groups(segmenter, 1.0, 0.0, 0.8)[-1]["params"]}


def test_grouping_lr_multiplier_scales_only_the_assignment_scalars():
    model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY, num_labels=3))
    names = {id(p): n for n, p in model.named_parameters()}
    plain = layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5, grouping_lr_multiplier=10.0)
    lr_of = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    plain_lr = {names[id(p)]: g["lr"] for g in plain for p in g["params"]}
    scalars = {n for n in lr_of if n.endswith(("grouping.relative_bias", "grouping.log_logit_scale"))}
    assert len(scalars) == 2 * (len(TINY["depths"]) - 1)  # a bias and a temperature per grouping layer
    for name in lr_of:
        assert lr_of[name] == pytest.approx(plain_lr[name] * (10.0 if name in scalars else 1.0)), name
    # the same depth keeps its schedule: the scalars' group is the backbone's, as their layer is
    assert all(g["is_backbone"] for g in groups if {names[id(p)] for p in g["params"]} <= scalars)
    # at x1 the groups are exactly the layer-decay groups (a no-op for recorded recipes)
    assert [len(g["params"]) for g in layer_decay_groups(model, 1.0, 0.05, 0.5, 1.0)] == [len(g["params"]) for g in plain]
    # a model without grouping layers has nothing to multiply
    none = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**{**TINY, "grouping_types": ["none"] * 3}, num_labels=3))
    assert [g["lr"] for g in layer_decay_groups(none, 1.0, 0.05, 1.0, 10.0)] == [1.0] * len(layer_decay_groups(none, 1.0, 0.05, 1.0))


def test_weight_average_is_a_warmed_up_moving_average_of_parameters_with_live_buffers():
    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(live, decay=0.9)
    expected = [p.detach().clone() for p in live.parameters()]
    for step in range(1, 40):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
        live(torch.randn(4, 3))  # moves BatchNorm's running statistics
        average.update(step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, live.parameters())]
    assert all(torch.allclose(a, e) for a, e in zip(average.model.parameters(), expected))
    assert not any(torch.equal(a, p) for a, p in zip(average.model.parameters(), live.parameters()))
    assert torch.equal(average.model[1].running_mean, live[1].running_mean)
    assert not any(p.requires_grad for p in average.model.parameters())
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(live, decay=1.0)


def test_two_stage_warmup_then_polynomial_decay():
    model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY, num_labels=3))
    optimizer = create_optimizer(model, lr=1.0, layer_decay=1.0)
    scheduler = create_scheduler(optimizer, total_steps=20, warmup_steps=4, backbone_warmup_steps=4, power=1.0)
    history = []
    for _ in range(20):
        history.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[-1]["lr"]))
        optimizer.step()
        scheduler.step()
    backbone, head = zip(*history)
    assert head[:6] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1 - 1 / 16])  # warm-up, then decay from step 4
    assert backbone[:4] == (0.0,) * 4  # frozen while the head warms up, then its own warm-up and decay
    assert backbone[4:10] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1 - 1 / 12])
    assert head[-1] == pytest.approx(1 / 16) and backbone[-1] == pytest.approx(1 / 12)


REMOTE_LOAD = textwrap.dedent(
    """
    import sys, json, torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation
    folder, image = sys.argv[1], Image.open(sys.argv[2])
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    segmentation = processor.post_process_semantic_segmentation(outputs, [(image.height, image.width)])[0]
    print(json.dumps({"class": type(model).__name__, "shape": list(segmentation.shape)}))
    """
)


def test_train_evaluate_save_and_publishable_folder(tmp_path, run_without_package):
    dataset = camvid_dataset(tmp_path / "camvid", max_images=2)
    args = run_args(tmp_path, dataset, config=tiny_config_folder(tmp_path / "config", num_labels=11), crop_height=64,
                    crop_width=96, eval_short_side=64)
    result = train(args)
    finish_run(result, args)
    metrics = result["metrics"]
    num_validation = 2  # real images from ../shared/data, else the bundled fixture and its mirror
    assert 0 <= metrics["mean_iou"] <= 1 and metrics["num_images"] == num_validation
    assert metrics["skipped_samples"] == 0
    folder = Path(args.output_dir) / "model"
    saved = evaluate_saved(folder, str(dataset))  # scripts/evaluate.py: the saved folder scores what training did
    assert saved["mean_iou"] == pytest.approx(metrics["mean_iou"]) and saved["num_images"] == num_validation
    card = (folder / "README.md").read_text()
    assert f"| mean IoU | {100 * metrics['mean_iou']:.2f} |" in card
    assert "CC BY-NC 4.0" in card and '"crop_height": 64' in card and "| sky |" in card
    record = next(iter(load_split(dataset, "validation", ["image"])))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(record["image"]["bytes"])
    out = run_without_package(REMOTE_LOAD, folder, photo)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"class": "SeNaTraForSemanticSegmentation", "shape": [360, 480]}


def test_class_weighting_is_computed_from_the_training_labels_and_saved(tmp_path):
    dataset = synthetic_dataset(tmp_path / "d", train=4, validation=2)
    result = train(run_args(tmp_path, dataset, max_steps=1, class_weighting="enet"))
    weights = result["model"].config.semantic_loss_weights
    labels = [np.asarray(Image.open(io.BytesIO(row["label"]["bytes"]))) for row in synthetic_rows(4)]
    assert weights == pytest.approx(class_weights(labels, 3, "enet"))
    result["model"].save_pretrained(tmp_path / "model")
    assert ns.SeNaTraConfig.from_pretrained(tmp_path / "model").semantic_loss_weights == pytest.approx(weights)
    with pytest.raises(ValueError, match="class_weighting applies to semantic models"):
        train(run_args(tmp_path, dataset, model="senatra-universal", class_weighting="enet"))


@pytest.mark.parametrize("model", ["senatra-universal", "eomt", "segmenter"])
def test_every_model_kind_trains(tmp_path, model):
    dataset = synthetic_dataset(tmp_path / "d", train=4, validation=2)
    configs = {
        "senatra-universal": lambda: ns.SeNaTraConfig(**TINY, num_queries=4, num_blocks=2, train_num_points=256),
        "eomt": lambda: EomtConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                   image_size=32, patch_size=8, num_queries=4, num_blocks=2, train_num_points=256),
        "segmenter": lambda: ns.SegmenterConfig(backbone_config=ns.SeNaTraConfig(**TINY), decoder_num_layers=1),
    }
    configs[model]().save_pretrained(tmp_path / "config")
    crop = dict(crop_height=32, crop_width=32) if model == "eomt" else {}
    result = train(run_args(tmp_path, dataset, model=model, config=str(tmp_path / "config"), max_steps=2, **crop))
    assert 0 <= result["metrics"]["mean_iou"] <= 1
    if model != "segmenter":  # annealing ran to its end: masked attention is off
        assert result["model"].attn_mask_probs.abs().max() < 1e-5


def test_training_threads_leave_a_core_to_each_worker(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert training_threads(num_workers=0) == 8
    assert training_threads(num_workers=3) == 5
    assert training_threads(num_workers=12) == 1  # never fewer than one
    assert training_threads(num_workers=3, requested=6) == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes on this machine share its cores
    assert training_threads(num_workers=1) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # what the launcher (or the user) set wins
    assert training_threads(num_workers=1) == 2


def test_train_runs_its_steps_with_the_threads_its_workers_leave(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(3)), raising=False)
    threads_before = torch.get_num_threads()
    seen = []
    original_step = training_loop.train_step

    def train_step(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original_step(*args, **kwargs)

    monkeypatch.setattr(training_loop, "train_step", train_step)
    dataset = synthetic_dataset(tmp_path / "d", train=4, validation=2)
    result = train(run_args(tmp_path, dataset, max_steps=2, eval_split="", num_workers=1))
    assert seen == [2, 2]  # 3 cores, one for the worker
    assert json.loads((result["output_dir"] / "all_results.json").read_text())["torch_threads"] == 2
    assert torch.get_num_threads() == threads_before  # restored once the workers are gone


def test_panoptic_training_uses_instance_maps(tmp_path):
    rows = synthetic_rows(4)
    for row in rows:  # one instance per class band
        row["instance"] = row["label"]
    from native_seg_hf.training.prepare import write_dataset

    write_dataset({"train": rows, "validation": rows[:1]}, ID2LABEL, tmp_path / "d", "# d\n", num_shards=1)
    args = run_args(tmp_path, tmp_path / "d", model="senatra-universal", task="panoptic", instance_column="instance",
                    config=tiny_config_folder(tmp_path / "config", num_queries=4, num_blocks=2, train_num_points=256),
                    max_steps=2)
    assert torch.isfinite(torch.tensor(train(args)["metrics"]["mean_iou"]))
    with pytest.raises(ValueError, match="needs a query model"):
        train(run_args(tmp_path, tmp_path / "d", task="panoptic"))


def steps_and_ids(path: Path) -> dict[int, list[str]]:
    """The samples of each step in a sample log, the last record of a step winning (a resumed run redoes the steps
    after its checkpoint)."""
    steps = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record["ids"]
    return steps


# Runs scripts/train.py (argv[1:]) and SIGKILLs it right after `accelerator.save_state` has written the checkpoint
# of step KILL_WHILE_SAVING, before the stream positions and the step file: a kill in the middle of a save.
KILL_WHILE_SAVING = textwrap.dedent(
    """
    import os, runpy, signal, sys
    from accelerate import Accelerator
    save_state = Accelerator.save_state
    def save_state_then_die(self, output_dir=None, **kwargs):
        result = save_state(self, output_dir, **kwargs)
        if str(output_dir).endswith("step_" + os.environ["KILL_WHILE_SAVING"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    Accelerator.save_state = save_state_then_die
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_kill_9_at_any_point_and_resume_continue_the_same_run(tmp_path, num_workers):
    """Killed in the middle of writing checkpoint 3, resumed, killed again at some moment after checkpoint 6,
    resumed to the end: the same samples at every step and the same final weights as an uninterrupted run, with
    decoding in the training process or in 2 DataLoader workers (one shard each, taking turns)."""
    dataset = synthetic_dataset(tmp_path / "d", train=12, validation=2, size=(96, 128))
    # 12 samples in batches of 2: a pass is 6 steps; the run goes into the second pass
    args = run_args(tmp_path, dataset, max_steps=9, save_steps=1, checkpoints_total_limit=3, sample_log=True,
                    crop_height=64, crop_width=96, eval_split="", num_workers=num_workers)
    reference = train(TrainArguments(**{**asdict(args), "output_dir": str(tmp_path / "reference"), "save_steps": 0}))
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *cli(args)]
    checkpoints = Path(args.output_dir) / "checkpoints"

    killed_while_saving = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, *command[1:]],
                                         env={**ENV, "KILL_WHILE_SAVING": "3"}, capture_output=True, text=True)
    assert killed_while_saving.returncode == -signal.SIGKILL, killed_while_saving.stderr[-2000:]
    assert not (checkpoints / "step_3").exists() and (checkpoints / ".tmp_step_3").is_dir()

    resume = command + ["--resume_from_checkpoint", "latest"]
    run = subprocess.Popen(resume, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (checkpoints / "step_6" / "trainer_state.json").exists() and run.poll() is None:
        time.sleep(0.02)
    os.kill(run.pid, signal.SIGKILL)  # wherever it is: mid-step, mid-save or between the two
    run.wait()
    assert run.returncode == -signal.SIGKILL, run.stderr.read()[-2000:]  # killed mid-run, not finished
    assert not (Path(args.output_dir) / "model").exists()
    resumed = subprocess.run(resume, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    ids = steps_and_ids(Path(args.output_dir) / "samples_0.jsonl")
    assert ids == steps_and_ids(tmp_path / "reference" / "samples_0.jsonl")  # same samples, same steps
    first_pass = sum((ids[step] for step in range(1, 7)), [])
    assert sorted(first_pass) == [f"s{i:03d}" for i in range(12)]  # each sample exactly once
    weights = load_file(Path(args.output_dir) / "model" / "model.safetensors")
    for name, value in reference["model"].state_dict().items():
        if name in weights:
            torch.testing.assert_close(weights[name], value, msg=name)
    assert [f.name for f in checkpoints.glob("step_*")] and len(list(checkpoints.glob("step_*"))) == 3


def test_accelerate_launch_two_processes(tmp_path):
    """Two CPU processes through `accelerate launch` (torchrun underneath, gloo): in accelerate 1.15,
    `accelerate launch --cpu --num_processes 2` starts one process unless given an MPI hostfile, so the CPU
    processes come from the multi-process launcher with ACCELERATE_USE_CPU=1."""
    dataset = synthetic_dataset(tmp_path / "d", train=12, validation=3, num_shards=2)
    args = run_args(tmp_path, dataset, max_steps=3, sample_log=True, save_steps=3)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "scripts" / "train.py"), *cli(args)]
    out = subprocess.run(command, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    output = Path(args.output_dir)
    ranks = [steps_and_ids(output / f"samples_{rank}.jsonl") for rank in (0, 1)]
    seen = [sum(rank.values(), []) for rank in ranks]
    assert len(seen[0]) == len(seen[1]) == 6 and not set(seen[0]) & set(seen[1])  # each process its own samples
    results = json.loads((output / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["metrics"]["num_images"] == 3
    assert {p.name for p in (output / "checkpoints" / "step_3").glob("stream_*.json")} == {"stream_0.json", "stream_1.json"}
    # resuming with another number of processes would split the stream differently: refused, naming both counts
    with pytest.raises(ValueError, match="written by 2 processes and this run has 1"):
        train(TrainArguments(**{**asdict(args), "max_steps": 4, "resume_from_checkpoint": "latest"}))


# One optimizer step on a fixed global batch of 4 images, split between the processes (`python` or `accelerate
# launch`); saves the loss (mean over processes) and the gradients (DDP-averaged) of a semantic and a universal model.
ONE_STEP = textwrap.dedent(
    """
    import os, sys
    import numpy as np, torch
    from PIL import Image
    from accelerate import Accelerator
    import native_seg_hf as ns
    from native_seg_hf.training.loop import train_step

    CONFIG = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 2], num_heads=[1, 2, 3, 4], attention_kernel_size=3,
                  head_hidden_size=32, drop_path_rate=0.0, num_labels=3, num_queries=6, num_blocks=1, train_num_points=64)
    # fixed points for the mask losses and the matcher instead of random ones, which differ with the split
    GRID = torch.stack(torch.meshgrid(*[torch.linspace(0.05, 0.95, 8)] * 2, indexing="xy"), -1).reshape(1, 64, 2)

    def global_batch():
        # every image holds the 3 classes (so each process has as many target masks), and a different number of
        # labelled pixels (so a plain mean of the processes' means is not the global mean)
        rng, samples = np.random.default_rng(0), []
        for i in range(4):
            label = np.zeros((64, 64), np.uint8)
            label[:, 21:], label[:, 42:] = 1, 2
            label[: 4 + 12 * i] = 255
            image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            samples.append({"id": str(i), "image": image, "label": label, "instance": None})
        return samples

    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    results = {}
    for kind, model_class, targets, extra in (
        ("semantic", ns.SeNaTraForSemanticSegmentation, "labels", {}),
        ("weighted", ns.SeNaTraForSemanticSegmentation, "labels", {"semantic_loss_weights": [0.5, 2.0, 7.0]}),
        ("universal", ns.SeNaTraForUniversalSegmentation, "class_masks", {}),
    ):
        torch.manual_seed(0)
        model = model_class(ns.SeNaTraConfig(**CONFIG, **extra))
        if kind == "universal":
            model.criterion.matcher.sample_coordinates = lambda device: GRID.to(device)
            model.criterion.sample_points_using_uncertainty = (
                lambda logits, *args: GRID.to(logits.device).expand(logits.shape[0], -1, -1))
        processor = ns.SeNaTraImageProcessor.from_model_config(model.config)
        model = accelerator.prepare(model)
        share = global_batch()[rank * 4 // world : (rank + 1) * 4 // world]
        loss, _ = train_step(model, [share], processor, accelerator, targets)
        grads = {n: p.grad.clone() for n, p in accelerator.unwrap_model(model).named_parameters() if p.grad is not None}
        results[kind] = {"loss": accelerator.reduce(torch.tensor(loss), "mean").item(), "grads": grads}
    if accelerator.is_main_process:
        torch.save(results, sys.argv[1])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if world > 1:
        # A launched rank skips the interpreter's teardown, where destructors of c10d's store and gloo's threads
        # can still abort it after every result is saved ("terminate called without an active exception": rare,
        # seen in a full CI run). The in-process run (world 1) returns normally.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
    """
)


def test_two_processes_compute_the_loss_and_gradients_of_one(tmp_path, monkeypatch):
    """`accelerate launch` with 2 CPU processes, each with half of a global batch, gives the loss and gradients of
    one process on the whole batch: semantic losses weighted by labelled pixels (or their class weights) over every
    process (`train_step`),
    universal mask losses normalised by the masks of every process (Transformers' get_num_masks made them 2x too
    large on 2 processes)."""
    script = tmp_path / "one_step.py"
    script.write_text(ONE_STEP)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
               str(tmp_path / "two.pt")]
    out = subprocess.run(command, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "one.pt")])
    runpy.run_path(str(script), run_name="__main__")  # the same step in this one process
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for kind in ("semantic", "weighted", "universal"):
        assert two[kind]["loss"] == pytest.approx(one[kind]["loss"], rel=1e-5), kind
        assert two[kind]["grads"].keys() == one[kind]["grads"].keys()
        for name, grad in one[kind]["grads"].items():
            torch.testing.assert_close(two[kind]["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=f"{kind} {name}")


# ---- Trainer ----


def trainer_model(kind: str, source):
    torch.manual_seed(0)
    id2label = load_id2label(source)
    if kind == "senatra":
        return ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY, id2label=id2label))
    backbone = ns.SeNaTraConfig(**TINY)
    return ns.SegmenterForSemanticSegmentation(ns.SegmenterConfig(backbone_config=backbone, id2label=id2label,
                                                                  decoder_num_layers=1, decoder_dropout=0.0))


@pytest.mark.parametrize("kind", ["senatra", "segmenter"])
def test_trainer_fine_tunes_on_camvid(tmp_path, kind):
    source = camvid_dataset(tmp_path / "camvid", max_images=2)
    model = trainer_model(kind, source)
    processor = ns.SeNaTraImageProcessor.from_model_config(model.config, size={"shortest_edge": 64})
    train_set = load_split(source, "train", ["image", "label"], streaming=False)
    val_set = load_split(source, "validation", ["image", "label"], streaming=False)
    args = HfTrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                               per_device_eval_batch_size=2, remove_unused_columns=False, batch_eval_metrics=True,
                               report_to="none", use_cpu=True, save_strategy="no", learning_rate=1e-3)
    trainer = Trainer(model, args, data_collator=default_data_collator,
                      train_dataset=train_set.with_transform(trainer_transform(processor, Augmentation((64, 96)))),
                      eval_dataset=val_set.with_transform(trainer_transform(processor)),
                      compute_metrics=MeanIoUMetrics(11, id2label=model.config.id2label),
                      preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    trainer.train()
    scores = trainer.evaluate()
    assert 0 <= scores["eval_mean_iou"] <= 1 and "eval_iou_sky" in scores


@pytest.mark.parametrize("kind", ["senatra", "segmenter"])
def test_trainer_gradient_accumulation_averages_the_loss(tmp_path, kind):
    """One SGD step (lr 1) over 2 accumulated micro-batches of 1 image moves the weights by minus the mean of the two
    images' gradients: the loss is divided by the accumulation steps exactly once (the pitfall: models whose forward
    takes **kwargs get it undivided unless they set accepts_loss_kwargs = False)."""
    source = camvid_dataset(tmp_path / "camvid", max_images=2)
    model = trainer_model(kind, source)
    assert model.accepts_loss_kwargs is False
    processor = ns.SeNaTraImageProcessor.from_model_config(model.config, size={"shortest_edge": 64})
    data = load_split(source, "train", ["image", "label"], streaming=False).with_transform(trainer_transform(processor))
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    model.train()
    for index in range(2):
        model.zero_grad()
        model(**default_data_collator([data[index]])).loss.backward()
        for name, p in model.named_parameters():
            expected[name] -= p.grad / 2
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    args = HfTrainingArguments(str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=1,
                               gradient_accumulation_steps=2, max_grad_norm=0.0, remove_unused_columns=False,
                               report_to="none", use_cpu=True, save_strategy="no")
    trainer = Trainer(model, args, train_dataset=data, data_collator=default_data_collator,
                      optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)))
    trainer.train()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)
