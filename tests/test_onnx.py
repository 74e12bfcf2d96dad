"""ONNX export: the semantic, universal (annealed) and Segmenter models export with dynamic height and width, and ONNX
Runtime gives PyTorch's outputs (relative difference under 1e-4) at two input sizes, the second one not traced, with
grids whose neighbourhood-attention tiles do not divide them; `scripts/export_onnx.py --check` does the same from a
saved folder."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import Dinov2Config

import native_seg_hf as ns

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from native_seg_hf.onnx_export import compare_with_pytorch, export_onnx, onnxruntime_session  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 2], num_heads=[1, 2, 3, 4], num_labels=5)
TOLERANCE = 1e-4
# Traced at 256x320: stages 1 to 3 (up to 16x20 tokens) take the tiled attention, stage 4 the dense one. Run also at
# 224x352, where stage 3's 14x22 grid is not a whole number of 4x4 tiles.
TRACED, OTHER = (256, 320), (224, 352)


def assert_matches_pytorch(model, path):
    session = onnxruntime_session(path)
    for size in (TRACED, OTHER):
        differences = compare_with_pytorch(model, session, torch.randn(1, 3, *size))
        assert all(value < TOLERANCE for value in differences.values()), (size, differences)


def test_semantic_senatra_runs_in_onnx_runtime_at_any_size(tmp_path):
    torch.manual_seed(0)
    model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY)).eval()
    assert_matches_pytorch(model, export_onnx(model, tmp_path / "semantic.onnx", TRACED))


def test_universal_senatra_exports_once_annealing_has_finished(tmp_path):
    torch.manual_seed(0)
    model = ns.SeNaTraForUniversalSegmentation(ns.SeNaTraConfig(**TINY, num_queries=6, num_blocks=1)).eval()
    with pytest.raises(ValueError, match="annealing"):
        export_onnx(model, tmp_path / "masked.onnx", TRACED)  # the graph would not compute what the model does
    model.attn_mask_probs.zero_()
    assert_matches_pytorch(model, export_onnx(model, tmp_path / "universal.onnx", TRACED))


def test_segmenter_traced_at_its_vits_native_grid_still_takes_any_size(tmp_path):
    # At the native 4x4 patch grid DINOv2 hands out its position table as it is; a graph traced there would keep it.
    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8, image_size=32)
    model = ns.SegmenterForSemanticSegmentation(ns.SegmenterConfig(backbone_config=backbone, num_labels=5)).eval()
    session = onnxruntime_session(export_onnx(model, tmp_path / "segmenter.onnx", (32, 32)))
    for size in ((32, 32), (48, 40), (27, 61)):
        assert compare_with_pytorch(model, session, torch.randn(1, 3, *size))["logits"] < TOLERANCE, size


def test_export_script_checks_a_saved_segmenter_at_two_sizes(tmp_path):
    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32)
    model = ns.SegmenterForSemanticSegmentation(
        ns.SegmenterConfig(backbone_config=backbone, decoder_type="mask_transformer", num_labels=5)
    )
    model.save_pretrained(tmp_path / "segmenter")
    script = os.path.join(ROOT, "scripts", "export_onnx.py")
    command = [sys.executable, script, "--model", tmp_path / "segmenter", "--output", tmp_path / "segmenter.onnx",
               "--height", "64", "--width", "96", "--check"]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    checked = [line for line in result.stdout.splitlines() if "relative difference" in line]
    assert len(checked) == 2 and checked[1].startswith("104x56"), result.stdout  # a size that was not traced
    loaded = ns.SegmenterForSemanticSegmentation.from_pretrained(tmp_path / "segmenter").eval()
    differences = compare_with_pytorch(loaded, onnxruntime_session(tmp_path / "segmenter.onnx"), torch.randn(1, 3, 50, 70))
    assert differences["logits"] < TOLERANCE  # Segmenter pads any size to whole patches itself
