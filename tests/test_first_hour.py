"""A user's first hour (issue 12): what the README tells a new user to run works as written.

- the Trainer recipe is a script (`scripts/train_with_trainer.py`) that runs, skips and names unreadable samples,
  names metrics by class, and saves a folder the pipeline loads;
- data preparation says what it prepares, decodes every image and reports those it leaves out;
- the model card carries the run's fields, valid for the Hub (license, datasets only as Hub ids, usage example);
- EoMT trains with the default crop, and a crop its input size cannot take stops before training;
- the help texts agree with the README;
- a wheel installed the regular way (not editable) trains and writes the folder that would be uploaded.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image
from transformers import EomtConfig

import native_seg_hf as ns
from native_seg_hf.training import loop
from native_seg_hf.training.data import collate, load_split
from native_seg_hf.training.hub import render_model_card
from native_seg_hf.training.loop import TrainArguments, build_model, check_crop_fits
from native_seg_hf.training.prepare import CAMVID_CLASSES, camvid_row, prepare, write_dataset
from segmentation_datasets import FIXTURE, camvid_dataset

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4], attention_kernel_size=3,
            head_hidden_size=32)


def user_env(tmp_path) -> dict:
    """A user's environment, offline, with every cache in the test's folder."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return env


def truncated_jpeg() -> bytes:
    data = FIXTURE.with_suffix(".jpg").read_bytes()
    return data[: len(data) // 2]


def camvid_with_a_broken_image(folder: Path) -> Path:
    """The bundled CamVid image (twice) plus one sample whose JPEG is cut in half, in train and validation."""
    good = camvid_row(FIXTURE.with_suffix(".jpg"), FIXTURE.with_suffix(".png"))
    broken = {**good, "id": "broken_0001", "image": {"bytes": truncated_jpeg(), "path": None}}
    rows = [good, {**good, "id": "second"}, broken]
    write_dataset({"train": rows, "validation": rows}, dict(enumerate(CAMVID_CLASSES)), folder,
                  "---\npretty_name: camvid\n---\n\nTerms: CC BY-NC 4.0.\n", num_shards=1)
    return folder


def test_trainer_recipe_script_saves_a_folder_the_pipeline_loads(tmp_path):
    dataset = camvid_with_a_broken_image(tmp_path / "camvid")
    out = tmp_path / "trainer"
    command = [sys.executable, str(ROOT / "scripts" / "train_with_trainer.py"), "--dataset", str(dataset),
               "--output_dir", str(out), "--preset", "nano", "--crop_height", "64", "--crop_width", "96",
               "--eval_short_side", "64", "--max_steps", "2", "--batch_size", "3"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=user_env(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "broken_0001" in run.stderr  # the skipped sample is named
    metrics = json.loads((out / "eval_results.json").read_text())
    assert "eval_iou_sky" in metrics and "eval_iou_0" not in metrics  # metrics named by class
    assert metrics["skipped_samples"] >= 2  # at least once in training and once in evaluation
    folder = out / "model"
    assert (folder / "preprocessor_config.json").is_file()  # processing_class: the pipeline needs it
    shown = json.loads(run.stdout.strip().splitlines()[-1])
    assert shown["pipeline"] == "SeNaTraForSemanticSegmentation" and shown["classes"]
    assert set(shown["classes"]) <= set(CAMVID_CLASSES)


def raw_camvid(root: Path) -> Path:
    """A raw CamVid folder as in ../shared/data (images/*.jpg, labels/*.png per split), one image truncated."""
    for split, names in (("train", ["a", "b"]), ("val", ["c"])):
        (root / "camvid" / split / "images").mkdir(parents=True)
        (root / "camvid" / split / "labels").mkdir(parents=True)
        for name in names:
            shutil.copy(FIXTURE.with_suffix(".jpg"), root / "camvid" / split / "images" / f"{name}.jpg")
            shutil.copy(FIXTURE.with_suffix(".png"), root / "camvid" / split / "labels" / f"{name}.png")
    (root / "camvid" / "train" / "images" / "b.jpg").write_bytes(truncated_jpeg())
    return root


def test_prepare_data_says_what_it_prepares_and_drops_unreadable_images(tmp_path):
    raw = raw_camvid(tmp_path / "raw")
    command = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "camvid", "--raw", str(raw), "--out",
               str(tmp_path / "out")]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=user_env(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    said = run.stdout + run.stderr
    assert "preparing camvid" in said and "CamVid road scenes" in said
    assert "dropped train/b" in said and "truncated" in said
    assert "camvid train: 1 samples verified, 1 dropped" in said
    assert "Creating parquet" not in said  # no nameless progress bars
    folder = tmp_path / "out" / "camvid"
    card = (folder / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "- train/b: " in card
    assert [r["id"] for r in load_split(folder, "train", ["image"])] == ["a"]


def test_prepare_keeps_every_sound_sample(tmp_path):
    raw = raw_camvid(tmp_path / "raw")
    (raw / "camvid" / "train" / "images" / "b.jpg").write_bytes(FIXTURE.with_suffix(".jpg").read_bytes())
    folder = prepare("camvid", raw, tmp_path / "out")
    assert "Left out" not in (folder / "README.md").read_text()


def card_of(tmp_path, dataset: str, model_id: str, **training_args) -> ModelCard:
    model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY, id2label=dict(enumerate(CAMVID_CLASSES))))
    metrics = {"mean_iou": 0.20853, "mean_accuracy": 0.3, "overall_accuracy": 0.6, "num_images": 2,
               "per_category_iou": [0.5] + [None] * 10}
    args = {"dataset": dataset, "task": "semantic", "eval_split": "validation", "model_name_or_path": None,
            **training_args}
    run = {"steps": 3, "transformers_version": "5", "num_processes": 1, "steps_per_second": 1.0}
    return ModelCard(render_model_card(model, metrics, args, run, model_id, "my-model"))


def test_model_card_fields_come_from_the_run(tmp_path):
    dataset = camvid_dataset(tmp_path / "camvid", max_images=1)  # a local folder prepare_data.py wrote
    folder = tmp_path / "run" / "model"
    card = card_of(tmp_path, str(dataset), str(folder))
    data = card.data.to_dict()
    assert data["license"] == "cc-by-nc-4.0"  # the data's license: CamVid's copy is CC BY-NC
    assert "datasets" not in data  # a local path is no Hub dataset
    assert str(tmp_path) not in card.data.to_yaml()
    assert data["pipeline_tag"] == "image-segmentation" and data["library_name"] == "transformers"
    result = data["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == "camvid" and result["metrics"][0]["value"] == 20.85
    assert f'model="{folder}"' in card.text  # not pushed: the usage example loads the folder
    assert "| mean IoU | 20.85 |" in card.text  # the one mIoU format: percent, 2 decimals

    hub = card_of(tmp_path, "someone/camvid-parquet", "me/senatra-camvid", model_name_or_path="me/senatra-base")
    data = hub.data.to_dict()
    assert data["datasets"] == ["someone/camvid-parquet"] and data["base_model"] == "me/senatra-base"
    assert data["license"] == "unknown"  # a Hub dataset's license is not known offline
    assert 'model="me/senatra-camvid"' in hub.text


def test_eomt_trains_with_the_default_crop(monkeypatch, tmp_path):
    """From scratch, EoMT's input size follows the crop (the default 256x352 used to fail at the first batch). The
    model class is replaced by a stand-in: only the config built for it matters here."""
    dataset = camvid_dataset(tmp_path / "camvid", max_images=1)
    monkeypatch.setitem(loop.MODELS, "eomt", lambda config: SimpleNamespace(config=config))
    args = TrainArguments(dataset=str(dataset), model="eomt")
    model = build_model(args, {0: "a", 1: "b"})
    assert model.config.image_size == max(args.crop_height, args.crop_width)
    check_crop_fits(model, args)
    crop = {"image": Image.new("RGB", (args.crop_width, args.crop_height)),
            "label": np.zeros((args.crop_height, args.crop_width), dtype=np.uint8)}
    batch = collate([crop], loop.image_processor(model, args), "class_masks")  # what the first batch failed in
    assert tuple(batch["pixel_values"].shape[-2:]) == (model.config.image_size,) * 2


def test_a_crop_eomt_cannot_take_stops_before_training(tmp_path):
    EomtConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64,
               patch_size=16, num_queries=4, num_blocks=1).save_pretrained(tmp_path / "config")
    dataset = camvid_dataset(tmp_path / "camvid", max_images=1)
    args = TrainArguments(dataset=str(dataset), model="eomt", config=str(tmp_path / "config"),
                          output_dir=str(tmp_path / "run"), max_steps=1)
    with pytest.raises(ValueError, match="64x64 inputs .* crops of 256x352 do not fit"):
        loop.train(args)


def test_help_texts_agree_with_the_readme():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--help"], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--cpu --num_processes 2 scripts" not in run.stdout and "--num_processes 2 --cpu" not in run.stdout
    readme = (ROOT / "README.md").read_text()
    launch = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/train.py"
    assert launch in run.stdout and launch in readme
    no_streaming = run.stdout.split("--no_streaming, --no-streaming")[1].split("--shuffle_buffer")[0]
    assert "loads it in memory" in " ".join(no_streaming.split())


@pytest.mark.slow
def test_a_regular_install_trains_and_writes_the_upload_folder(tmp_path):
    """Build a wheel, install it (not editable) into a fresh virtualenv, run a 3-step training with
    scripts/train.py from outside the clone: the model card template must come from the installed package.
    Nothing is downloaded: the wheel is built with the installed setuptools, installed without its dependencies,
    and the fresh environment sees this interpreter's packages (torch, transformers, ...) through a .pth file."""
    source = tmp_path / "source"  # a clean copy: setuptools' build/ folder would otherwise land in the clone
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env = user_env(tmp_path)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("native_seg_hf-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # This interpreter's packages (not its editable native_seg_hf: .pth files of an added path are not run).
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_project_packages.pth").write_text("\n".join(paths) + "\n")
    installed = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, env=env)
    assert installed.returncode == 0, installed.stderr[-3000:]
    where = subprocess.run([python, "-c", "import importlib.util; print(importlib.util.find_spec('native_seg_hf').origin)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr

    dataset = camvid_dataset(tmp_path / "camvid", max_images=1)
    ns.SeNaTraConfig(**TINY).save_pretrained(tmp_path / "config")
    out = tmp_path / "run"
    command = [python, str(ROOT / "scripts" / "train.py"), "--dataset", str(dataset), "--output_dir", str(out),
               "--config", str(tmp_path / "config"), "--crop_height", "32", "--crop_width", "64",
               "--per_device_batch_size", "2", "--max_steps", "3", "--eval_short_side", "32",
               "--no_streaming"]  # in memory: a Parquet stream pauses 5 s at the end of each pass (datasets)
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = out / "model"
    files = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= files
    assert {"modeling_senatra.py", "configuration_senatra.py"} <= files  # remote code
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "cc-by-nc-4.0" and "mean IoU" in card.text


# ---- a time budget that holds whatever the load ----


def test_run_length_replans_from_the_pace_so_far():
    from native_seg_hf.training.optim import RunLength

    assert RunLength(50).update(10, elapsed=1000.0) == 50  # no budget: the steps asked for
    length = RunLength(100_000, minutes=1)
    assert length.steps == 100_000  # nothing measured yet: the cap
    assert length.update(10, elapsed=30.0) == 20  # 3 s a step: 20 fit in 60 s
    assert length.update(15, elapsed=56.0) == 16  # slower now: one more step fits
    assert length.update(16, elapsed=59.0) == 16  # less time left than a step takes: stop here
    assert RunLength(12, minutes=1).update(10, elapsed=1.0) == 12  # the cap holds


def test_a_time_budget_ends_on_time_when_the_machine_slows_down(tmp_path, monkeypatch):
    """After a few steps every step takes 0.4 s longer (the machine got busy, or a pass over the data ends with a
    pause): a plan made from the first steps' pace would overrun its budget several times; the run re-plans and
    ends on time, with its lr decayed."""
    import datasets

    from segmentation_datasets import synthetic_dataset

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # the slowdown below is the test's
    durations = []
    real_step = loop.train_step

    def slowing_step(*args, **kwargs):
        start = time.perf_counter()
        result = real_step(*args, **kwargs)
        if len(durations) >= 5:
            time.sleep(0.4)
        durations.append(time.perf_counter() - start)
        return result

    monkeypatch.setattr(loop, "train_step", slowing_step)
    dataset = synthetic_dataset(tmp_path / "d", train=8, validation=1, num_shards=1)
    ns.SeNaTraConfig(**TINY).save_pretrained(tmp_path / "config")
    budget = 4.0
    args = TrainArguments(dataset=str(dataset), output_dir=str(tmp_path / "run"), config=str(tmp_path / "config"),
                          crop_height=32, crop_width=64, per_device_batch_size=2, learning_rate=1e-3,
                          max_steps=100_000, max_train_minutes=budget / 60, max_eval_samples=1, shuffle_buffer=4,
                          sample_log=True)
    result = loop.train(args)
    early_pace = sum(durations[1:5]) / 4
    assert result["steps"] == len(durations) < budget / early_pace  # fewer than a plan from the early pace
    assert result["train_seconds"] <= budget + max(durations) + 0.5
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "samples_0.jsonl").read_text().splitlines()]
    assert len(lrs) == result["steps"] and lrs[-1] < 0.35 * args.learning_rate  # the schedule ended with the run
