"""The learning benchmark (scripts/benchmark_learning.py) and the grouping diagnosis, on a few steps of small data."""

import json
import runpy
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EomtForUniversalSegmentation
from transformers.modeling_outputs import SemanticSegmenterOutput

import native_seg_hf as ns
from native_seg_hf.models.image_processing_senatra import semantic_logits
from native_seg_hf.models.modeling_senatra import semantic_cross_entropy
from native_seg_hf.training.data import class_weights
from native_seg_hf.training import learning
from native_seg_hf.training.diagnosis import (
    assignment_statistics, gradient_statistics, grouping_scalars, label_bounds, majority_labels,
)
from native_seg_hf.training.learning import (
    MODEL_BUILDERS, RECIPES, BatchSource, RunSpec, class_mask_targets, evaluate_semantic, load_samples, make_optimizer,
    pad_to_square, parse_run_name, predict, run_name, square_input_side, train_and_evaluate, train_step,
)
from native_seg_hf.training.learning_report import BEGIN, END, learning_table, paired_table, render_readme_table
from segmentation_datasets import camvid_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    return camvid_dataset(tmp_path_factory.mktemp("camvid"), max_images=2)


def test_batches_depend_only_on_seed_and_step(camvid):
    samples = load_samples(camvid, "train")
    a, b = BatchSource(samples, RECIPES["smoke"], seed=0), BatchSource(samples, RECIPES["smoke"], seed=0)
    other = BatchSource(samples, RECIPES["smoke"], seed=1)
    for step in (0, 3):
        first, second = a.batch(step), b.batch(step)
        assert torch.equal(first["pixel_values"], second["pixel_values"]) and torch.equal(first["labels"], second["labels"])
        assert first["pixel_values"].shape == (2, 3, *RECIPES["smoke"].crop)
    assert not torch.equal(a.batch(0)["pixel_values"], other.batch(0)["pixel_values"])


class LabelEcho(torch.nn.Module):
    """A 'model' that predicts the label map it was built with, at stride 4: mIoU must be (close to) 100."""

    def __init__(self, label):
        super().__init__()
        self.label = torch.from_numpy(np.array(label)).long()

    def forward(self, pixel_values):
        one_hot = torch.nn.functional.one_hot(self.label.clamp(max=10), 11).permute(2, 0, 1).float()[None]
        height, width = pixel_values.shape[-2:]
        # the 480x360 image, resized to 240x180, occupies the top-left of the padded input: place the label
        # there, at stride 4 (45x60)
        logits = torch.zeros(1, 11, height // 4, width // 4)
        logits[..., :45, :60] = torch.nn.functional.interpolate(one_hot, size=(45, 60), mode="nearest")
        return SemanticSegmenterOutput(logits=logits)


def test_evaluation_scores_at_the_label_size_and_ignores_padding(camvid):
    sample = load_samples(camvid, "validation")[0]
    perfect = evaluate_semantic(LabelEcho(sample["label"]), [sample], num_labels=11, short_side=180)
    # Stride-4 nearest sampling loses thin poles and signs, and void pixels echo as class 10: well below 100,
    # but any misalignment of the crop (padding kept, wrong scale) costs far more, as a shift shows.
    assert perfect["mean_iou"] > 55
    shifted = LabelEcho(np.roll(sample["label"], 60, axis=1))
    assert evaluate_semantic(shifted, [sample], num_labels=11, short_side=180)["mean_iou"] < perfect["mean_iou"] - 15


def test_run_writes_a_record_the_check_reads(camvid, tmp_path):
    spec = RunSpec("senatra", "smoke", seed=0)
    record = train_and_evaluate(spec, camvid, tmp_path, "test", log=lambda *_: None, save_model=tmp_path / "model")
    saved = json.loads(spec.path(tmp_path).read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["model"] == "senatra" and saved["recipe"] == "smoke" and saved["seed"] == 0
    assert set(saved["val_miou_by_step"]) == {"2", "4"}
    assert all(0 <= v <= 100 for v in saved["val_miou_by_step"].values())
    assert saved["parameters"] > 1e6 and saved["gflops_at_eval_size"] > 0 and saved["seconds_per_step"] > 0
    assert len(saved["per_class_iou_by_step"]["4"]) == 11
    assert not spec.path(tmp_path).with_suffix(".partial").exists()
    saved_model = ns.SeNaTraForSemanticSegmentation.from_pretrained(tmp_path / "model")
    assert saved_model.config.id2label == {int(k): v for k, v in saved["id2label"].items()}  # the dataset's names
    assert saved_model.config.label2id[saved["id2label"]["0"]] == 0


def test_a_recipe_with_a_weight_average_scores_and_saves_the_average(camvid, tmp_path, monkeypatch):
    monkeypatch.setitem(RECIPES, "smoke-average", replace(RECIPES["smoke"], weight_average=0.5))
    scored = []
    monkeypatch.setattr(learning, "evaluate_semantic", lambda model, *args: scored.append(model) or
                        {"mean_iou": 1.0, "per_class_iou": [1.0] * 11})
    spec = RunSpec("senatra", "smoke-average", seed=0)
    train_and_evaluate(spec, camvid, tmp_path, "test", log=lambda *_: None, save_model=tmp_path / "model")
    live_run = []
    monkeypatch.setattr(learning, "evaluate_semantic", lambda model, *args: live_run.append(model) or
                        {"mean_iou": 1.0, "per_class_iou": [1.0] * 11})
    train_and_evaluate(RunSpec("senatra", "smoke", seed=0), camvid, tmp_path, "test", log=lambda *_: None)
    averaged, live = scored[-1].state_dict(), live_run[-1].state_dict()
    assert any(not torch.equal(averaged[k], live[k]) for k in live)  # the average, not the last weights
    saved = ns.SeNaTraForSemanticSegmentation.from_pretrained(tmp_path / "model").state_dict()
    assert all(torch.equal(saved[k], averaged[k]) for k in saved)


def test_the_universal_model_trains_on_class_masks_with_annealing(camvid, tmp_path):
    record = train_and_evaluate(RunSpec("senatra-universal", "smoke", seed=0), camvid, tmp_path, "test",
                                log=lambda *_: None, save_model=tmp_path / "model")
    assert set(record["val_miou_by_step"]) == {"2", "4"}
    saved = ns.SeNaTraForUniversalSegmentation.from_pretrained(tmp_path / "model")
    assert torch.all(saved.attn_mask_probs == 0)  # annealed to the end of the 4-step schedule


def test_transformers_eomt_trains_on_square_crops_and_is_scored_through_windows(camvid, tmp_path):
    record = train_and_evaluate(RunSpec("eomt-vit-s", "smoke", seed=0), camvid, tmp_path, "test",
                                log=lambda *_: None, save_model=tmp_path / "model")
    assert set(record["val_miou_by_step"]) == {"2", "4"} and record["parameters"] > 2e7
    saved = EomtForUniversalSegmentation.from_pretrained(tmp_path / "model")
    assert saved.config.image_size == max(RECIPES["smoke"].crop)  # the recipe's longer crop side
    assert torch.all(saved.attn_mask_probs == 0)  # annealed to the end of the 4-step schedule


def test_a_fixed_size_models_batches_are_padded_to_its_square():
    batch = {"pixel_values": torch.ones(2, 3, 64, 96), "labels": torch.zeros(2, 64, 96, dtype=torch.long)}
    padded = pad_to_square(batch, 96)
    assert padded["pixel_values"].shape == (2, 3, 96, 96) and padded["labels"].shape == (2, 96, 96)
    assert torch.all(padded["pixel_values"][..., 64:, :] == 0) and torch.all(padded["labels"][:, 64:] == 255)
    assert torch.equal(padded["labels"][:, :64], batch["labels"])
    with pytest.raises(ValueError, match="do not fit"):
        pad_to_square(batch, 80)


def test_a_fixed_size_model_predicts_every_pixel_through_windows():
    torch.manual_seed(0)
    model = MODEL_BUILDERS["eomt-vit-s"](11, {}, RECIPES["smoke"]).eval()
    assert square_input_side(model) == 96
    assert type(model.criterion.matcher).__name__ == "SeNaTraHungarianMatcher"  # trained as scripts/train.py does
    assert square_input_side(MODEL_BUILDERS["senatra"](11, {}, RECIPES["smoke"])) is None
    window = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        alone = torch.nn.functional.interpolate(semantic_logits(model(pixel_values=window)), size=(96, 96),
                                                mode="bilinear", align_corners=False)
    assert torch.allclose(predict(model, window), alone, atol=1e-5)  # one window: the model's own scores
    wide = torch.cat([window, torch.randn(1, 3, 96, 64)], dim=-1)  # 96x160: two windows, overlapping by 32
    scores = predict(model, wide)
    assert scores.shape == (1, 11, 96, 160)
    assert torch.allclose(scores[..., :64], alone[..., :64], atol=1e-5)  # covered by the first window only


def test_class_mask_targets_have_one_mask_per_labelled_class():
    labels = torch.tensor([[[0, 0, 3], [255, 3, 3]], [[255, 255, 255], [255, 255, 255]]])
    targets = class_mask_targets(labels)
    assert targets["class_labels"][0].tolist() == [0, 3] and targets["class_labels"][1].numel() == 0
    assert targets["mask_labels"][0].shape == (2, 2, 3) and targets["mask_labels"][1].shape == (0, 2, 3)
    assert targets["mask_labels"][0][1].tolist() == [[0, 0, 1], [0, 1, 1]]


def test_class_weights_grow_as_a_class_gets_rarer():
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[:, 8:] = 1  # class 1: 20% of the labelled pixels; class 2 absent; void (255) ignored
    labels[0, :] = 255
    weights = class_weights([labels], num_labels=3, method="enet")
    shares = np.array([72 / 90, 18 / 90, 0.0])  # of the 90 labelled pixels
    assert weights == pytest.approx((1 / np.log(1.02 + shares)).tolist())
    assert weights[0] < weights[1] < weights[2]
    assert class_weights([labels], 3, None) is None
    with pytest.raises(ValueError, match="class_weighting"):
        class_weights([labels], 3, "median")


def test_the_benchmarks_weighted_loss_with_equal_weights_is_each_models_own_loss(camvid):
    batch = BatchSource(load_samples(camvid, "train"), RECIPES["smoke"], seed=0).batch(0)
    batch["labels"][0, :8] = 255
    for name in ("senatra", "segformer-b0"):
        torch.manual_seed(0)
        # eval: no stochastic depth between the two forwards
        model = MODEL_BUILDERS[name](11, {}, RECIPES["smoke"]).eval()
        own = model(**batch).loss
        logits = semantic_logits(model(pixel_values=batch["pixel_values"]))
        equal = semantic_cross_entropy(logits, batch["labels"], 255, [3.0] * 11)
        assert equal.item() == pytest.approx(own.item(), rel=1e-5)


def test_class_weighting_is_refused_for_query_models(camvid):
    recipe = RECIPES["smoke"]
    batch = BatchSource(load_samples(camvid, "train"), recipe, seed=0).batch(0)
    model = MODEL_BUILDERS["senatra-universal"](11, {}, recipe)
    with pytest.raises(ValueError, match="query models"):
        train_step(model, *make_optimizer(model, recipe), batch, recipe.max_grad_norm, torch.ones(11))


def test_truncated_runs_and_variants_are_named_apart():
    assert RunSpec("senatra", "smoke", steps=2).recipe_label == "smoke@2"
    assert RunSpec("senatra", "smoke").recipe_label == "smoke"
    assert run_name("senatra", {"grouping_parent_bias": 0.0}) == "senatra[grouping_parent_bias=0.0]"
    assert run_name("senatra", {}) == "senatra"


@pytest.mark.parametrize("overrides", [{}, {"grouping_types": ["local", "local"]},
                                       {"grouping_logit_scale": None, "grouping_parent_bias": 0.0},
                                       {"a": {"b": [1, 2]}, "c": "x,y=z"}])
def test_a_variants_run_name_parses_back(overrides):
    assert parse_run_name(run_name("senatra", overrides)) == ("senatra", overrides)


@pytest.mark.parametrize("name", ["segnet", "senatra[grouping_iterations=2", "senatra[=2]", "senatra[a=nope]"])
def test_a_bad_variant_name_is_refused(name):
    with pytest.raises(ValueError):
        parse_run_name(name)


def test_script_times_variants_side_by_side(camvid, tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["benchmark_learning.py", "--time", "--time_steps", "1", "--recipe", "smoke",
                                      "--models", "senatra", 'senatra[grouping_types=["local","local"]]',
                                      "--dataset", str(camvid), "--results", str(results)])
    runpy.run_path(str(ROOT / "scripts" / "benchmark_learning.py"), run_name="__main__")
    (path,) = (results / "timing").glob("*.json")
    seconds = json.loads(path.read_text())["seconds_per_step"]
    assert set(seconds) == {"senatra", 'senatra[grouping_types=["local","local"]]'} and min(seconds.values()) > 0
    assert '"' not in path.name


def test_script_skips_measured_runs_and_renders_the_table(camvid, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    argv = ["benchmark_learning.py", "--models", "senatra-none", "--recipe", "smoke", "--dataset", str(camvid),
            "--results", str(results)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "scripts" / "benchmark_learning.py"), run_name="__main__")
    (path,) = results.glob("*.json")
    before = path.stat().st_mtime_ns
    runpy.run_path(str(ROOT / "scripts" / "benchmark_learning.py"), run_name="__main__")
    assert "already measured" in capsys.readouterr().out and path.stat().st_mtime_ns == before

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n")
    render_readme_table(results, readme)
    text = readme.read_text()
    assert "old" not in text and "`senatra-none`" in text and text.startswith("intro") and text.endswith("outro\n")
    assert learning_table([json.loads(path.read_text())]).count("| `senatra-none` | 0 |") == 1


def test_paired_table_differences_each_model_from_its_ablation_at_the_same_seed():
    def run(model, seed, curve, recipe="r"):
        return {"model": model, "recipe": recipe, "seed": seed, "val_miou_by_step": curve}

    runs = [run("senatra", 0, {"250": 30.0, "500": 40.0}), run("senatra-none", 0, {"250": 31.0, "500": 35.0}),
            run("senatra", 1, {"250": 20.0, "500": 36.0}), run("senatra-none", 1, {"250": 18.0, "500": 37.0}),
            run("senatra", 2, {"250": 25.0}),  # no ablation at seed 2: left out of the pairs
            run("senatra-none", 3, {"250": 50.0, "500": 50.0}),  # nor an ablation without its model
            run("senatra[grouping_iterations=2]", 0, {"250": 1.0, "500": 1.0}),  # a variant has no "-none"
            run("senatra-nano", 0, {"250": 10.0}), run("segformer-b0", 0, {"250": 10.0, "500": 10.0}),
            run('senatra-none[uniform_upsampling="bilinear"]', 1, {"250": 19.0, "500": 38.0})]  # an ablation variant
    table = paired_table(runs)
    assert "- `senatra` - `senatra-none`, seeds 0,1: @250 +0.5 (-1.0 to +2.0), @500 +2.0 (-1.0 to +5.0); " \
           "ahead at 1 of 2 seeds @500" in table
    assert '- `senatra` - `senatra-none[uniform_upsampling="bilinear"]`, seeds 1: @250 +1.0, @500 -2.0; ' \
           "ahead at 0 of 1 seeds @500" in table
    assert "grouping_iterations" not in table and "nano" not in table and "segformer" not in table
    assert paired_table([run("senatra", 0, {"250": 1.0})]) == ""


def test_diagnosis_measures_a_model(camvid):
    torch.manual_seed(0)
    model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig.from_preset("nano", num_labels=11))
    samples = load_samples(camvid, "validation")[:1]
    batch = BatchSource(samples, RECIPES["smoke"], 0).batch(0)
    stats = assignment_statistics(model, batch["pixel_values"])
    assert [s["kind"] for s in stats] == ["local", "local", "dense"]
    for level in stats:
        assert 0 <= level["mean_entropy"] <= level["max_entropy"] + 1e-6
        assert 1 <= min(level["groups_used_per_image"]) <= level["groups_possible"]
    bounds = label_bounds(model, samples, 64, 11)
    assert set(bounds) >= {"oracle_native", "oracle_grid", "soft", "hard", "tokens"}
    assert all(0 <= v["mean_iou"] <= 100 and len(v["per_class_iou"]) == 11 for v in bounds.values())
    # Strided downsampling: its segments are the grid, and its one-hot assignments are their own hardening.
    torch.manual_seed(0)
    strided = ns.SeNaTraForSemanticSegmentation(
        ns.SeNaTraConfig.from_preset("nano", num_labels=11, grouping_types=["none"] * 3))
    bounds = label_bounds(strided, samples, 64, 11)
    assert bounds["oracle_native"] == bounds["oracle_grid"] and bounds["soft"] == bounds["hard"]
    grads = gradient_statistics(model, batch)
    assert grads["grouping.query"]["grad_norm"] > 0 and grads["head"]["grad_norm"] > 0
    scalars = grouping_scalars(model)  # freshly initialised: exactly the configured starting values
    assert [layer["kind"] for layer in scalars] == ["local", "local", "dense"]
    config = model.config
    assert all(layer["parent_bias"] == pytest.approx(config.grouping_parent_bias) for layer in scalars)
    assert all(layer["logit_scale"] == pytest.approx(config.grouping_logit_scale) for layer in scalars)
    assert all(layer["other_bias_min"] == layer["other_bias_max"] == 0 for layer in scalars)
    with torch.no_grad():
        model.senatra.encoder.stages[1].grouping.relative_bias.add_(1.0)
    assert grouping_scalars(model)[0]["parent_bias"] == pytest.approx(config.grouping_parent_bias + 1)


def test_majority_labels_paint_each_segment_with_its_most_frequent_valid_label():
    segments = np.array([[0, 0, 1], [0, 1, 1]])
    label = np.array([[2, 2, 255], [3, 4, 4]])
    assert majority_labels(segments, label, 5).tolist() == [[2, 2, 4], [2, 4, 4]]


def load_script(name: str) -> dict:
    return runpy.run_path(str(ROOT / "scripts" / name))


def test_uniform_grid_matches_the_segment_count():
    uniform_grid = load_script("benchmark_native_segments.py")["uniform_grid"]
    for count in (1, 7, 48, 150, 600):
        grid = uniform_grid(321, 481, count)
        assert abs(len(np.unique(grid)) - count) <= max(1, 0.05 * count)
        assert grid.shape == (321, 481)
        rows, cols = len(np.unique(grid[:, 0])), len(np.unique(grid[0]))
        cell_aspect = (321 / rows) / (481 / cols)
        assert 0.6 < cell_aspect < 1.7 or count < 10, f"{count}: {rows}x{cols} cells are not near-square"


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "bsds500" / "val").is_dir(),
                    reason="../shared/data/bsds500 is absent: the native-segments benchmark needs BSDS500")
def test_native_segments_benchmark_scores_every_level(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig.from_preset("nano", num_labels=11)).save_pretrained(tmp_path / "m")
    out = tmp_path / "segments.json"
    monkeypatch.setattr(sys, "argv", ["x", str(tmp_path / "m"), "--images", "1", "--short_side", "96", "--out", str(out)])
    runpy.run_path(str(ROOT / "scripts" / "benchmark_native_segments.py"), run_name="__main__")
    levels = json.loads(out.read_text())["levels"]
    assert set(levels) == {"1", "2", "3"}
    for scores in levels.values():
        assert set(scores) == {"native", "uniform_grid", "slic"}
        assert all(0 <= s["achievable_segmentation_accuracy"] <= 1 for s in scores.values())


def test_the_stride16_preset_labels_tokens_at_stride_16():
    model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig.from_preset("nano-s16", num_labels=11))
    assert model.config.input_size_divisor == 16 and model.config.grouping_types == ["local", "local"]
    assert model.config.grouping_iterations == 1
    out = model.senatra(torch.randn(1, 3, 64, 96))
    assert out.last_hidden_state.shape[-2:] == (4, 6)
    logits = model(pixel_values=torch.randn(1, 3, 64, 96)).logits
    assert logits.shape == (1, 11, 16, 24)


def test_run_records_name_no_machine_folders(tmp_path, monkeypatch):
    from native_seg_hf.training.learning import portable_path

    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "outputs" / "m") == "outputs/m"
    assert portable_path(Path.home() / ".cache" / "x") == "~/.cache/x"  # tmp_path lies outside the home folder
