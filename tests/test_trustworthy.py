"""Trustworthy training (issue 11): no silent wrong data (the test session's own caches, a cache per dataset folder,
zero losses for unlabelled batches, a resumed schedule that follows the new length), fine-tuning from saved SeNaTra
models (config kwargs, `--change_head`, the meta device, config validation), losses that do not depend on the
number of processes (matcher in float32), the export guard, the cached dense offsets and a gradient check that
catches detached grouping iterations.

The kill-at-any-point and two-process checks live in tests/test_training.py with the other runs of the loop."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from datasets import load_dataset
from transformers import EomtConfig, Trainer, default_data_collator
from transformers import TrainingArguments as HfTrainingArguments

import native_seg_hf as ns
from native_seg_hf.models import grouping
from native_seg_hf.models import modeling_senatra
from native_seg_hf.models.modeling_senatra import SeNaTraGroupingLayer, SeNaTraHungarianMatcher, global_num_masks
from native_seg_hf.training.data import load_split
from native_seg_hf.training import loop
from native_seg_hf.training.loop import (
    TrainArguments, build_model, checkpoint_folders, latest_checkpoint, save_checkpoint, train,
)
from native_seg_hf.training.optim import lr_factor
from native_seg_hf.training.prepare import CAMVID_CLASSES, png_bytes, prepare_camvid_files, write_dataset
from native_seg_hf.training.trainer import trainer_transform
from segmentation_datasets import FIXTURE, ID2LABEL, synthetic_dataset, synthetic_rows

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 2], num_heads=[1, 2, 3, 4], attention_kernel_size=3,
            head_hidden_size=32, drop_path_rate=0.0)
CAMVID_LABELS = dict(enumerate(CAMVID_CLASSES))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}


@pytest.fixture(autouse=True)
def no_parquet_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s whenever a Parquet stream's iteration ends (apache/arrow#45214); not needed here."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def run_args(tmp_path, dataset, **kwargs) -> TrainArguments:
    config = tmp_path / "config"
    if "config" not in kwargs and "model_name_or_path" not in kwargs:
        ns.SeNaTraConfig(**TINY).save_pretrained(config)
        kwargs["config"] = str(config)
    defaults = dict(dataset=str(dataset), output_dir=str(tmp_path / "run"), crop_height=32, crop_width=64,
                    per_device_batch_size=2, max_steps=2, learning_rate=1e-3, logging_steps=1, shuffle_buffer=4,
                    eval_split="")
    return TrainArguments(**{**defaults, **kwargs})


# ---- silent wrong data ----


def test_the_test_session_uses_its_own_caches():
    """conftest.py points every Hugging Face cache of the run at a temporary folder: tests never write into (or read
    from) the user's ~/.cache/huggingface."""
    import huggingface_hub
    import transformers.utils.hub
    from conftest import SESSION_CACHE

    user_cache = Path.home() / ".cache"
    for path in (datasets.config.HF_DATASETS_CACHE, huggingface_hub.constants.HF_HUB_CACHE,
                 transformers.utils.hub.HF_MODULES_CACHE):
        assert Path(path).is_relative_to(SESSION_CACHE) and not Path(path).is_relative_to(user_cache), path


def test_onnx_runtime_writes_nothing_into_the_users_cache():
    """ONNX Runtime writes a device id and a database under $XDG_CACHE_HOME/Microsoft/DeveloperTools (by the time
    its process ends); conftest.py points XDG_CACHE_HOME at the session's folder, so ~/.cache/Microsoft stays as it
    was. The session runs in a child process with the test run's environment, so that its writes have landed."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    def listing(folder: Path) -> dict:
        return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}

    user_folder = Path.home() / ".cache" / "Microsoft"
    before = listing(user_folder)
    script = textwrap.dedent(
        """
        import numpy as np, onnxruntime
        from onnx import TensorProto, helper
        x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in "xy")
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.run(None, {"x": np.array([-1.0], np.float32)})[0].tolist() == [0.0]
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=os.environ.copy())
    assert listing(user_folder) == before


def camvid_copies(folder: Path, count: int) -> Path:
    """A prepared folder named like the real set, with `count` training rows (copies of the bundled image)."""
    pair = (FIXTURE.with_suffix(".jpg"), FIXTURE.with_suffix(".png"))
    return prepare_camvid_files({"train": [pair] * count, "validation": [pair]}, folder)


def test_a_folder_is_never_served_another_folders_cache(tmp_path):
    """datasets keys a local folder's cache entry by the folder's name: the entry of a 2-row `camvid` was served for
    every later non-streamed load of another `camvid` folder. `load_split` caches by path and content."""
    # Both folders share a name no other test uses: an earlier test's `camvid` entry (of however many rows) would
    # otherwise be what the first load_dataset serves.
    small = camvid_copies(tmp_path / "a" / "camvid_cache_probe", 2)
    assert len(load_dataset(str(small), split="train")) == 2  # plants the entry under the shared name
    assert len(load_split(small, "train", ["image", "label"], streaming=False)) == 2
    big = camvid_copies(tmp_path / "b" / "camvid_cache_probe", 5)
    assert len(load_split(big, "train", ["image", "label"], streaming=False)) == 5
    shutil.rmtree(small)
    camvid_copies(small, 3)  # the same folder written anew: its new content, not its cached old one
    assert len(load_split(small, "train", ["image", "label"], streaming=False)) == 3


@pytest.mark.parametrize("kind", ["senatra", "segmenter"])
def test_an_unlabelled_batch_gives_a_zero_loss_that_keeps_the_graph(kind):
    torch.manual_seed(0)
    if kind == "senatra":
        model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY, num_labels=3))
    else:
        model = ns.SegmenterForSemanticSegmentation(
            ns.SegmenterConfig(backbone_config=ns.SeNaTraConfig(**TINY), num_labels=3, decoder_num_layers=1))
    model.eval()  # no dropout: the same logits at every call
    pixels = torch.randn(2, 3, 64, 64)
    loss = model(pixels, labels=torch.full((2, 64, 64), 255)).loss
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    labels = torch.randint(0, 3, (2, 64, 64))
    labels[0] = 255  # a half-ignored batch keeps the mean over its labelled pixels
    logits = model(pixels).logits
    upsampled = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.cross_entropy(upsampled, labels, ignore_index=255)
    torch.testing.assert_close(model(pixels, labels=labels).loss, expected)
    # Class weights: torch's weighted mean (over the labelled pixels' weights); still 0 with nothing labelled.
    model.config.semantic_loss_weights = [0.5, 2.0, 7.0]
    weighted = torch.nn.functional.cross_entropy(upsampled, labels, weight=torch.tensor([0.5, 2.0, 7.0]),
                                                 ignore_index=255)
    torch.testing.assert_close(model(pixels, labels=labels).loss, weighted)
    assert model(pixels, labels=torch.full((2, 64, 64), 255)).loss.item() == 0
    model.config.semantic_loss_weights = [1.0, 2.0]
    with pytest.raises(ValueError, match="2 weights for 3 classes"):
        model(pixels, labels=labels)


def test_the_loop_counts_unlabelled_batches(tmp_path):
    rows = synthetic_rows(3)
    for row in rows[:2]:  # training samples without a labelled pixel: every batch of 2 has none
        row["label"] = png_bytes(np.full((64, 96), 255, dtype=np.uint8))
    write_dataset({"train": rows[:2], "validation": rows[2:]}, ID2LABEL, tmp_path / "d", "# d\n", num_shards=1)
    result = train(run_args(tmp_path, tmp_path / "d", max_steps=2))
    assert result["metrics"]["unlabelled_batches"] == 2
    assert all(torch.isfinite(p).all() for p in result["model"].parameters())


def test_resuming_with_more_steps_follows_the_new_schedule(tmp_path, capsys):
    """A run of 2 steps ends at lr 0; resumed to 4 steps, steps 3 and 4 run at the 4-step schedule's lr (they ran
    at lr 0 before: the optimizer state carried the old schedule's last lr)."""
    dataset = synthetic_dataset(tmp_path / "d", train=4, validation=1, num_shards=1)
    args = run_args(tmp_path, dataset, max_steps=2, save_steps=2, sample_log=True)
    train(args)
    train(TrainArguments(**{**args.__dict__, "max_steps": 4, "resume_from_checkpoint": "latest"}))
    assert "now runs to --max_steps 4" in capsys.readouterr().out
    steps = {}
    for line in (Path(args.output_dir) / "samples_0.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record["lr"]
    assert steps[2] == pytest.approx(1e-3 * lr_factor(1, 0, 2))
    assert [steps[3], steps[4]] == pytest.approx([1e-3 * lr_factor(step, 0, 4) for step in (2, 3)])
    assert min(steps[3], steps[4]) > 0


def test_latest_skips_incomplete_checkpoints(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step, files in ((2, {"trainer_state.json": {"step": 2, "num_processes": 1}, "stream_0.json": {}}),
                        (3, {"stream_0.json": {}}),  # killed before its state was written
                        (4, {"trainer_state.json": {"step": 4, "num_processes": 2}, "stream_0.json": {}})):
        (checkpoints / f"step_{step}").mkdir(parents=True)
        for name, content in files.items():
            (checkpoints / f"step_{step}" / name).write_text(json.dumps(content))
    (checkpoints / ".tmp_step_5").mkdir()  # a save in progress is not a checkpoint
    assert [f.name for f in checkpoint_folders(tmp_path)] == ["step_2", "step_3", "step_4"]
    assert latest_checkpoint(tmp_path) == checkpoints / "step_2"


class OneProcess:
    """The part of an Accelerator that `save_checkpoint` uses, for one process writing a token file."""

    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_text("weights")


class NoStream:
    def state_dict(self):
        return {}


def test_a_kill_while_pruning_a_checkpoint_leaves_none_half_deleted(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        save_checkpoint(OneProcess(), NoStream(), tmp_path, step, limit=2)
    assert [f.name for f in checkpoint_folders(tmp_path)] == ["step_2", "step_3"]

    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes the state file first, then the process dies
        if "step_2" in str(path):
            (Path(path) / "trainer_state.json").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(loop.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(OneProcess(), NoStream(), tmp_path, 4, limit=2)
    assert [f.name for f in checkpoint_folders(tmp_path)] == ["step_3", "step_4"]  # no half-deleted step_2
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_4"
    monkeypatch.setattr(loop.shutil, "rmtree", real_rmtree)
    save_checkpoint(OneProcess(), NoStream(), tmp_path, 5, limit=2)
    assert sorted(f.name for f in (tmp_path / "checkpoints").iterdir()) == ["step_4", "step_5"]  # leftover cleared


# ---- fine-tuning from a saved SeNaTra model ----


@pytest.fixture
def saved_camvid_model(tmp_path):
    """A saved SeNaTra semantic model with CamVid's 11 classes."""
    torch.manual_seed(0)
    model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY, id2label=CAMVID_LABELS))
    model.save_pretrained(tmp_path / "camvid_model")
    return model, tmp_path / "camvid_model"


def test_from_pretrained_takes_the_config_kwargs_of_fine_tuning(saved_camvid_model, tmp_path):
    saved, folder = saved_camvid_model
    label2id = {name: i for i, name in ID2LABEL.items()}
    model = ns.SeNaTraForSemanticSegmentation.from_pretrained(folder, num_labels=3, id2label=ID2LABEL,
                                                              label2id=label2id, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 3 and model.config.id2label == ID2LABEL
    assert model(torch.randn(1, 3, 64, 64)).logits.shape[1] == 3
    torch.testing.assert_close(model.senatra.state_dict(), saved.senatra.state_dict())  # the backbone is kept
    assert ns.SeNaTraForSemanticSegmentation.from_pretrained(folder, head_hidden_size=32).config.head_hidden_size == 32

    # ... and fine-tunes with Trainer on the new label set
    dataset = synthetic_dataset(tmp_path / "d", train=2, validation=1, num_shards=1)
    processor = ns.SeNaTraImageProcessor.from_model_config(model.config, size={"shortest_edge": 64})
    data = load_split(dataset, "train", ["image", "label"], streaming=False).with_transform(trainer_transform(processor))
    trainer_args = HfTrainingArguments(str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                                       remove_unused_columns=False, report_to="none", use_cpu=True, save_strategy="no")
    before = model.head[-1].weight.detach().clone()
    Trainer(model, trainer_args, train_dataset=data, data_collator=default_data_collator).train()
    assert not torch.equal(model.head[-1].weight, before)


def test_the_loop_fine_tunes_a_saved_model_to_another_label_set(saved_camvid_model, tmp_path):
    saved, folder = saved_camvid_model
    dataset = synthetic_dataset(tmp_path / "d", train=2, validation=1, num_shards=1)
    result = train(run_args(tmp_path, dataset, model_name_or_path=str(folder), max_steps=1, learning_rate=1e-9))
    model = result["model"]
    assert model.config.id2label == ID2LABEL and model.head[-1].out_features == 3
    stem = "senatra.embeddings.convs.0.weight"
    torch.testing.assert_close(model.state_dict()[stem], saved.state_dict()[stem], atol=1e-6, rtol=0)


def test_train_script_starts_a_universal_model_from_a_semantic_checkpoint(saved_camvid_model, tmp_path):
    saved, folder = saved_camvid_model
    dataset = synthetic_dataset(tmp_path / "d", train=2, validation=1, num_shards=1)
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--dataset", str(dataset), "--output_dir",
               str(tmp_path / "run"), "--model", "senatra-universal", "--model_name_or_path", str(folder),
               "--crop_height", "32", "--crop_width", "64", "--per_device_batch_size", "2", "--max_steps", "1",
               "--eval_split", "", "--shuffle_buffer", "2"]
    with pytest.raises(ValueError, match="change_head"):  # without the flag: refused, naming it
        train(run_args(tmp_path, dataset, model="senatra-universal", model_name_or_path=str(folder)))
    run = subprocess.run(command + ["--change_head"], env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    model = ns.SeNaTraForUniversalSegmentation.from_pretrained(tmp_path / "run" / "model")
    assert model.config.id2label == ID2LABEL and model.class_predictor.out_features == 4


@pytest.mark.parametrize("build", ["torch.device", "init_empty_weights"])
def test_every_model_builds_on_the_meta_device(build):
    config = ns.SeNaTraConfig.from_preset("nano", drop_path_rate=0.3)
    classes = [ns.SeNaTraModel, ns.SeNaTraBackbone, ns.SeNaTraForImageClassification,
               ns.SeNaTraForSemanticSegmentation, ns.SeNaTraForUniversalSegmentation]
    for model_class in classes:
        with torch.device("meta") if build == "torch.device" else init_empty_weights():
            model = model_class(config)
        assert {p.device.type for p in model.parameters()} == {"meta"}, model_class.__name__
    with torch.device("meta"):
        segmenter = ns.SegmenterForSemanticSegmentation(ns.SegmenterConfig(backbone_config=config))
    assert {p.device.type for p in segmenter.parameters()} == {"meta"}
    rates = [layer.drop_path.drop_prob for stage in model.senatra.encoder.stages for layer in stage.layers]
    assert rates == pytest.approx([0.3 * i / (len(rates) - 1) for i in range(len(rates))])


@pytest.mark.parametrize(
    "field,value",
    [
        ("depths", [1, -2, 4, 2]), ("depths", [1, 0, 4, 2]), ("depths", "1124"), ("hidden_sizes", "wide"),
        ("hidden_sizes", [32, 64.0, 128, 256]), ("num_heads", [1, 2, True, 8]), ("drop_path_rate", -3.0),
        ("drop_path_rate", 1.0), ("mlp_ratio", 0), ("mlp_ratio", float("nan")), ("num_channels", 0),
        ("patch_size", 4.0), ("attention_kernel_size", -3), ("rope_theta", -1.0), ("grouping_types", "local"),
        ("grouping_iterations", 0), ("grouping_bias_radius", -1), ("layer_scale_init_value", -0.1),
        ("hidden_act", "swish-ish"), ("layer_norm_eps", 0.0), ("initializer_range", -0.02), ("head_hidden_size", 0),
        ("semantic_loss_ignore_index", 2.5), ("num_queries", 0), ("num_blocks", 0), ("class_weight", -1.0),
        ("mask_weight", "5"), ("dice_weight", float("inf")), ("no_object_weight", -0.1), ("train_num_points", 0),
        ("oversample_ratio", 0.5), ("importance_sample_ratio", 1.5), ("grouping_logit_scale", 0.0),
        ("grouping_parent_bias", float("nan")), ("grouping_zero_init_residual", 1), ("semantic_loss_weights", "enet"),
        ("semantic_loss_weights", [1.0, -2.0]), ("semantic_loss_weights", [1.0, float("nan")]),
        ("semantic_loss_weights", []), ("uniform_upsampling", "bicubic"),
    ],
)
def test_bad_config_fields_raise_a_value_error_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        ns.SeNaTraConfig(**{field: value})


def test_a_config_with_a_bad_depth_is_refused_at_load(tmp_path):
    """A negative depth used to build (fewer blocks) and load a checkpoint with keys missing, computing other outputs."""
    ns.SeNaTraModel(ns.SeNaTraConfig(**TINY)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "depths": [1, -1, 1, 2]}))
    with pytest.raises(ValueError, match="depths"):
        ns.SeNaTraModel.from_pretrained(tmp_path)


# ---- losses ----


def test_matcher_costs_are_float32_and_finite(monkeypatch):
    torch.manual_seed(0)
    dtypes = []
    original = modeling_senatra.pair_wise_dice_loss

    def spy(inputs, labels):
        cost = original(inputs, labels)
        dtypes.append(cost.dtype)
        return cost

    monkeypatch.setattr(modeling_senatra, "pair_wise_dice_loss", spy)
    matcher = SeNaTraHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    masks, classes = torch.randn(2, 6, 16, 16), torch.randn(2, 6, 4)
    targets = [(torch.rand(3, 16, 16) > 0.5).float(), (torch.rand(2, 16, 16) > 0.5).float()]
    labels = [torch.tensor([0, 1, 2]), torch.tensor([1, 1])]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        matcher(masks, classes, targets, labels)
    matcher(masks.bfloat16(), classes.bfloat16(), [t.bfloat16() for t in targets], labels)
    assert dtypes == [torch.float32] * 4
    masks[0, :4], classes[1, :] = float("nan"), float("inf")  # a diverged model still gets a full matching
    for (rows, cols), target in zip(matcher(masks, classes, targets, labels), targets):
        assert len(rows) == len(set(rows.tolist())) == len(target) and sorted(cols.tolist()) == list(range(len(target)))
    assert {4, 5} <= set(matcher(masks, classes, targets, labels)[0][0].tolist())  # finite queries matched first


def test_universal_loss_normalises_masks_over_every_process():
    """In one process the number of masks is the batch's; with several, their sum over processes divided by their
    number (the two-process equality itself: tests/test_training.py)."""
    model = ns.SeNaTraForUniversalSegmentation(ns.SeNaTraConfig(**TINY, num_labels=3, num_queries=4))
    labels = [torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([], dtype=torch.long)]
    assert model.criterion.get_num_masks(labels, torch.device("cpu")).item() == 3
    assert model.criterion.get_num_masks([labels[2]], torch.device("cpu")).item() == 1


def test_transformers_eomt_trained_by_the_loop_gets_the_same_loss_rules(tmp_path):
    """Transformers' EoMT loss has the same num_masks bug: the loop gives it our rule and matcher."""
    EomtConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8, num_queries=4, num_blocks=1).save_pretrained(tmp_path / "eomt")
    model = build_model(TrainArguments(dataset="-", model="eomt", config=str(tmp_path / "eomt")), ID2LABEL)
    assert model.criterion.get_num_masks is global_num_masks
    assert isinstance(model.criterion.matcher, SeNaTraHungarianMatcher) and model.criterion.matcher.num_points == 12544


# ---- export and memory ----


def test_export_refuses_a_model_still_annealing():
    model = ns.SeNaTraForUniversalSegmentation(ns.SeNaTraConfig(**TINY, num_labels=3, num_queries=4)).eval()
    pixels = torch.randn(1, 3, 64, 64)
    model.attn_mask_probs.fill_(0.5)
    with pytest.raises(ValueError, match="annealing"):
        torch.export.export(model, (), {"pixel_values": pixels})
    model.attn_mask_probs.zero_()  # annealed: exports, and the export computes what eager does
    exported = torch.export.export(model, (), {"pixel_values": pixels}).module()
    torch.testing.assert_close(exported(pixel_values=pixels).masks_queries_logits,
                               model(pixels).masks_queries_logits)


def test_dense_offsets_are_built_once_per_grid_size():
    layer = SeNaTraGroupingLayer(ns.SeNaTraConfig(**TINY), 16, 32, "dense")
    grouping._cached_dense_bias_index.cache_clear()
    first, again = grouping.dense_bias_index(8, 12, 16), grouping.dense_bias_index(8, 12, 16)
    assert first is again and grouping.dense_bias_index(8, 16, 16) is not first
    assert grouping._cached_dense_bias_index.cache_info().hits == 1
    offsets = grouping.dense_relative_offsets(8, 12).clamp(-16, 17) + 16
    assert torch.equal(first.long(), offsets[..., 0] * 34 + offsets[..., 1])
    with torch.inference_mode():  # first built under inference mode, still usable for training
        grouping.dense_bias_index(4, 4, layer.bias_radius)
    layer.relative_bias.data.normal_()
    layer.position_bias(4, 4).sum().backward()
    assert layer.relative_bias.grad.abs().sum() > 0


# ---- a gradient test that cannot hide detached iterations ----


@pytest.mark.parametrize("kind", ["local", "dense"])
def test_grouping_gradients_match_finite_differences_through_every_iteration(kind, monkeypatch):
    """The autograd gradient of a 3-iteration grouping layer, w.r.t. its input and every parameter, equals the
    numerical one; a layer whose earlier iterations are detached (a common K-means shortcut) fails this check."""
    torch.manual_seed(0)
    layer = SeNaTraGroupingLayer(ns.SeNaTraConfig(**TINY, grouping_iterations=3), 4, 8, kind).double()
    for parameter in layer.parameters():
        parameter.data.normal_(0, 0.5)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]

    def output(x, *parameters):
        return torch.func.functional_call(layer, dict(zip(names, parameters)), (x,))[0]

    inputs = (x, *[p.detach().clone().requires_grad_() for p in layer.parameters()])
    assert torch.autograd.gradcheck(output, inputs, atol=1e-5, rtol=1e-3, fast_mode=True)

    step_name = f"{kind}_grouping_step"
    step, calls = getattr(modeling_senatra, step_name), []

    def detached_before_the_last(*args):
        calls.append(1)
        update, assignment = step(*args)
        return (update.detach(), assignment) if len(calls) % 3 else (update, assignment)

    monkeypatch.setattr(modeling_senatra, step_name, detached_before_the_last)
    # The same comparison as gradcheck's fast mode, written out: a failing gradcheck reruns its slow mode (minutes).
    direction, weights = torch.randn_like(x), torch.randn(1, 2, 2, 8, dtype=torch.float64)
    (gradient,) = torch.autograd.grad((output(*inputs) * weights).sum(), x)
    with torch.no_grad():
        numerical = ((output(x + 1e-6 * direction, *inputs[1:]) - output(x - 1e-6 * direction, *inputs[1:])) * weights).sum() / 2e-6
    gap = ((gradient * direction).sum() - numerical).abs()
    assert gap > 1e-3 * numerical.abs(), (gap, numerical)  # the detached paths are missing from the gradient
