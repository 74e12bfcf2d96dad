"""SeNaTraForUniversalSegmentation and mask annealing (ours and Transformers' EoMT)."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageSegmentation,
    AutoModelForUniversalSegmentation,
    EomtConfig,
    EomtForUniversalSegmentation,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import TrainerControl, TrainerState

import native_seg_hf as ns
from native_seg_hf.models.grouping import upsample_through
from native_seg_hf.training import MaskAnnealingCallback, annealing_windows, mask_annealing_probabilities, set_mask_annealing

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_panoptic_sample" / "sample_data"


def tiny_universal(**kwargs):
    config = dict(
        hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 2], num_heads=[1, 2, 3, 4], attention_kernel_size=3,
        num_labels=3, num_queries=8, num_blocks=2, drop_path_rate=0.0, train_num_points=1024,
    )
    return ns.SeNaTraForUniversalSegmentation(ns.SeNaTraConfig(**{**config, **kwargs}))


def toy_targets():
    masks = [torch.zeros(2, 64, 96), torch.zeros(1, 64, 96)]
    masks[0][0, :32], masks[0][1, 32:], masks[1][0, :, :40] = 1, 1, 1
    return masks, [torch.tensor([0, 2]), torch.tensor([1])]


def test_output_shapes_and_loss():
    torch.manual_seed(0)
    model = tiny_universal()
    masks, classes = toy_targets()
    out = model(torch.randn(2, 3, 64, 96), mask_labels=masks, class_labels=classes)
    assert out.class_queries_logits.shape == (2, 8, 4)
    assert out.masks_queries_logits.shape == (2, 8, 16, 24)
    assert out.last_hidden_state.shape == (2, 64, 2, 3)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.query.weight.grad.abs().sum() > 0 and model.class_predictor.weight.grad.abs().sum() > 0


class PredictCounter:
    def __init__(self, model):
        self.calls, self.masks = 0, []
        original_predict = model.predict
        original_layers = model.senatra.encoder.stages[-1].layers

        def predict(*args):
            self.calls += 1
            return original_predict(*args)

        model.predict = predict
        for layer in original_layers:
            # layer(hidden_states, rotation, attention_mask): the query blocks pass their mask third
            layer.register_forward_pre_hook(lambda mod, args: self.masks.append(args[2] if len(args) > 2 else None))


@pytest.mark.parametrize("probs,expected_calls,masked_blocks", [([0, 0], 1, []), ([1, 1], 3, [0, 1]), ([1, 0], 2, [0])])
def test_eval_predicts_only_in_blocks_with_nonzero_probability(probs, expected_calls, masked_blocks):
    model = tiny_universal(depths=[1, 1, 1, 3]).eval()
    model.attn_mask_probs.copy_(torch.tensor(probs, dtype=torch.float))
    counter = PredictCounter(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert counter.calls == expected_calls
    query_block_masks = counter.masks[1:]  # the first final-stage block runs before the queries join
    # A block with probability 0 gets no mask: the mask of an earlier block is never reused.
    assert [i for i, m in enumerate(query_block_masks) if m is not None] == masked_blocks


def test_masked_attention_restricts_queries_to_their_masks():
    logits = torch.tensor([[[[1.0, -1.0], [-1.0, 1.0]]]])  # one query, a 2x2 grid
    always = ns.SeNaTraForUniversalSegmentation.query_attention_mask(logits, torch.tensor(1.0))
    assert always.shape == (1, 1, 5, 5)
    assert always[0, 0, 0].tolist() == [True, True, False, False, True]  # itself + tokens with logit > 0
    assert always[0, 0, 1:].all()  # tokens attend to everything
    never = ns.SeNaTraForUniversalSegmentation.query_attention_mask(logits, torch.tensor(0.0))
    assert never.all()


def test_carrying_logits_equals_carrying_features():
    # Native masks: dot at stride 32 then carry the logits == carry the features then dot at stride 4.
    torch.manual_seed(1)
    model = tiny_universal().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
        tokens = out.last_hidden_state.permute(0, 2, 3, 1)
        features = upsample_through(tokens, out.assignments, model.config.grouping_types)  # (1, 16, 24, C)
        queries = model.senatra.layernorm(model.query.weight)  # not the trained queries: any embedding works
        embeddings = model.mask_head(queries)
        via_features = torch.einsum("kc,bhwc->bkhw", embeddings, features)
        via_logits = model.masks_to_stride4(torch.einsum("kc,bhwc->bkhw", embeddings, tokens), out.assignments)
    assert torch.allclose(via_features, via_logits, atol=1e-4)


def test_export_matches_eager():
    torch.manual_seed(2)
    model = tiny_universal().eval()
    model.attn_mask_probs.zero_()
    x = torch.randn(1, 3, 64, 96)
    exported = torch.export.export(model, (), {"pixel_values": x})
    with torch.no_grad():
        eager = model(pixel_values=x)
        traced = exported.module()(pixel_values=x)
    assert torch.allclose(traced.masks_queries_logits, eager.masks_queries_logits, atol=1e-5)
    assert torch.allclose(traced.class_queries_logits, eager.class_queries_logits, atol=1e-5)


def test_semantic_model_exports_too():
    model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**{**TINY_BACKBONE, "num_labels": 2})).eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (), {"pixel_values": x})
    assert torch.allclose(exported.module()(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-5)


TINY_BACKBONE = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4])


@pytest.mark.parametrize(
    "masks,classes,message",
    [
        ([torch.zeros(1, 64, 96)], [torch.tensor([0])], "one entry per image"),
        ([torch.zeros(1, 64, 96)] * 2, [torch.tensor([0, 1]), torch.tensor([0])], "num_segments"),
        ([torch.zeros(1, 64, 96)] * 2, [torch.tensor([3]), torch.tensor([0])], r"\[0, 3\)"),
    ],
)
def test_bad_targets_raise_value_error(masks, classes, message):
    with pytest.raises(ValueError, match=message):
        tiny_universal()(torch.randn(2, 3, 64, 96), mask_labels=masks, class_labels=classes)


def test_universal_needs_query_blocks():
    with pytest.raises(ValueError, match="num_blocks"):
        tiny_universal(num_blocks=0)


def test_save_load_and_remote_code(tmp_path, run_without_package):
    torch.manual_seed(3)
    model = tiny_universal().eval()
    model.attn_mask_probs.copy_(torch.tensor([0.5, 0.0]))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForUniversalSegmentation.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.attn_mask_probs, model.attn_mask_probs)  # the annealing state is saved
    model.attn_mask_probs.zero_()
    loaded.attn_mask_probs.zero_()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x).masks_queries_logits
        assert torch.equal(loaded(x).masks_queries_logits, reference)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        """
        import sys, torch
        from transformers import AutoModelForUniversalSegmentation
        model = AutoModelForUniversalSegmentation.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        model.attn_mask_probs.zero_()
        with torch.no_grad():
            torch.save(model(torch.load(sys.argv[1] + "/x.pt")).masks_queries_logits, sys.argv[1] + "/remote.pt")
        """
    )
    run_without_package(script, tmp_path)
    assert torch.equal(torch.load(tmp_path / "remote.pt"), reference)


def test_task_models_load_only_their_own_checkpoints(tmp_path):
    # pipeline() tries AutoModelForImageSegmentation first; a semantic checkpoint must not load as universal.
    semantic = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**{**TINY_BACKBONE, "num_labels": 2}))
    semantic.save_pretrained(tmp_path / "semantic")
    with pytest.raises(ValueError, match="holds a SeNaTraForSemanticSegmentation"):
        AutoModelForImageSegmentation.from_pretrained(tmp_path / "semantic")
    with pytest.raises(ValueError, match="change_head=True"):
        ns.SeNaTraForUniversalSegmentation.from_pretrained(tmp_path / "semantic")
    changed = ns.SeNaTraForUniversalSegmentation.from_pretrained(tmp_path / "semantic", change_head=True)
    assert torch.equal(changed.senatra.embeddings.convs[0].weight, semantic.senatra.embeddings.convs[0].weight)
    semantic.senatra.save_pretrained(tmp_path / "backbone")  # a backbone checkpoint starts any task model
    assert type(AutoModelForUniversalSegmentation.from_pretrained(tmp_path / "backbone")).__name__ == (
        "SeNaTraForUniversalSegmentation"
    )


def coco_panoptic_targets(size=(128, 160)):
    """The two COCO panoptic sample images at `size`, with binary masks and contiguous class ids."""
    info = json.loads((COCO / "panoptic_examples.json").read_text())
    categories = sorted({s["category_id"] for a in info["annotations"] for s in a["segments_info"]})
    images, masks, classes = [], [], []
    for annotation in info["annotations"]:
        name = annotation["file_name"]
        image = Image.open(COCO / "input_images" / name.replace(".png", ".jpg")).convert("RGB")
        image = np.asarray(image.resize(size[::-1], Image.BILINEAR), dtype=np.float32) / 127.5 - 1
        rgb = np.asarray(Image.open(COCO / "panoptic_examples" / name).convert("RGB").resize(size[::-1], Image.NEAREST))
        rgb = rgb.astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        segments = [s for s in annotation["segments_info"] if (ids == s["id"]).any()]
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        masks.append(torch.from_numpy(np.stack([ids == s["id"] for s in segments])).float())
        classes.append(torch.tensor([categories.index(s["category_id"]) for s in segments]))
    return torch.stack(images), masks, classes, len(categories)


@pytest.mark.skipif(not COCO.is_dir(), reason="../shared/data/coco_panoptic_sample is absent")
def test_loss_decreases_on_real_panoptic_images():
    torch.manual_seed(4)
    images, masks, classes, num_labels = coco_panoptic_targets()
    model = tiny_universal(num_labels=num_labels, num_queries=16, train_num_points=2048)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(30):
        set_mask_annealing(model, step, total_steps=30)
        loss = model(images, mask_labels=masks, class_labels=classes).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_annealing_matches_eomt_configs_and_closed_form():
    # EoMT's COCO 1x configs (T = 88692): four blocks, and three blocks for ViT-S/B.
    assert annealing_windows(88692, 4) == ([14782, 29564, 44346, 59128], [29564, 44346, 59128, 73910])
    assert annealing_windows(88692, 3) == ([14782, 36955, 59128], [29564, 51737, 73910])
    for step in [0, 14781, 14782, 20000, 29564, 50000, 73909, 73910, 88692]:
        probs = mask_annealing_probabilities(step, 88692, 4)
        starts, ends = annealing_windows(88692, 4)
        for p, s, e in zip(probs.tolist(), starts, ends):
            expected = 1.0 if step < s else 0.0 if step >= e else (1 - (step - s) / (e - s)) ** 0.9
            assert p == pytest.approx(expected, abs=1e-6)
    assert mask_annealing_probabilities(20000, 88692, 4)[0] == pytest.approx((1 - 5218 / 14782) ** 0.9, abs=1e-6)


def test_set_mask_annealing_floors_only_transformers_eomt():
    ours = tiny_universal()
    eomt = EomtForUniversalSegmentation(tiny_eomt_config())
    assert set_mask_annealing(ours, 90, 100).tolist() == [0.0, 0.0]
    assert torch.all(set_mask_annealing(eomt, 90, 100) > 0)  # all > 0 while training: no stale masks
    assert set_mask_annealing(eomt, 100, 100).tolist() == [0.0, 0.0]


def test_callback_resumes_from_the_global_step():
    model = tiny_universal()
    callback = MaskAnnealingCallback(total_steps=600)
    state = TrainerState(global_step=250, max_steps=600)
    callback.on_train_begin(None, state, TrainerControl(), model=model)
    assert torch.allclose(model.attn_mask_probs, mask_annealing_probabilities(250, 600, 2))


def tiny_eomt_config():
    return EomtConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_queries=4, num_blocks=2, num_labels=3, train_num_points=256,
    )


class EomtData(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        masks = torch.zeros(2, 32, 32)
        masks[0, :, : 8 + i] = 1
        masks[1] = 1 - masks[0]
        return {"pixel_values": torch.randn(3, 32, 32, generator=g), "mask_labels": masks, "class_labels": torch.tensor([0, 2])}


def collate(batch):
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "mask_labels": [b["mask_labels"] for b in batch],
        "class_labels": [b["class_labels"] for b in batch],
    }


class RecordProbs(TrainerCallback):
    def __init__(self):
        self.seen = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen[state.global_step] = model.attn_mask_probs.clone()


def test_trainer_with_callback_on_transformers_eomt_ends_unmasked(tmp_path):
    torch.manual_seed(5)
    model = EomtForUniversalSegmentation(tiny_eomt_config())
    recorder = RecordProbs()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=EomtData(), data_collator=collate,
        callbacks=[MaskAnnealingCallback(), recorder],
    )
    trainer.train()
    assert model.attn_mask_probs.tolist() == [0.0, 0.0]
    # The annealing callback runs before the recorder, so each recorded value is the schedule at that step.
    for step, probs in recorder.seen.items():
        expected = mask_annealing_probabilities(step, 12, 2).clamp(min=1e-6) if step < 12 else torch.zeros(2)
        assert torch.allclose(probs, expected), (step, probs, expected)
    assert recorder.seen[3][0] < 1 and recorder.seen[3][1] == 1  # the first block anneals first
