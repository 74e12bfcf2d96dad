"""SeNaTra models: shapes, the assignment hierarchy, gradients, Transformers integration, Hub round trips and
bad inputs. Tiny configs on the CPU."""

import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

import native_seg_hf as ns
from native_seg_hf.models.grouping import NEIGHBOUR_OFFSETS
from native_seg_hf.models.modeling_senatra import SeNaTraGroupingLayer, apply_rotary_2d, rotary_embedding_2d

TINY = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4], attention_kernel_size=3)


def tiny_config(**kwargs):
    return ns.SeNaTraConfig(**{**TINY, **kwargs})


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (160, 32)])
def test_stage_shapes_and_assignments(size):
    torch.manual_seed(0)
    height, width = size
    model = ns.SeNaTraModel(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width), output_hidden_states=True)
    strides = [4, 4, 8, 16, 32]
    widths = [16, 16, 32, 48, 64]
    assert [tuple(h.shape) for h in out.hidden_states] == [
        (2, c, height // s, width // s) for c, s in zip(widths, strides)
    ]
    assert out.last_hidden_state.shape == (2, 64, height // 32, width // 32)
    assert out.pooler_output.shape == (2, 64)
    n_last = (height // 32) * (width // 32)
    assert [tuple(a.shape) for a in out.assignments] == [
        (2, height // 4, width // 4, 9),
        (2, height // 8, width // 8, 9),
        (2, height // 16, width // 16, n_last),
    ]
    for a in out.assignments:  # rows of A_ups sum to 1
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5)


def test_hierarchy_composition_and_native_segments():
    torch.manual_seed(1)
    model = ns.SeNaTraModel(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 128))
    h4, w4 = 3, 4
    identity = torch.eye(h4 * w4).T.reshape(1, h4 * w4, h4, w4)  # channel c is the indicator of token c
    composed = model.upsample_to_stage(identity, out.assignments, source_stage=4, target_stage=1)
    assert composed.shape == (1, 12, 24, 32)
    assert torch.allclose(composed.sum(1), torch.ones(1, 24, 32), atol=1e-5)  # the composed map is row-stochastic
    to_stage3 = model.upsample_to_stage(identity, out.assignments, source_stage=4, target_stage=3)
    assert to_stage3.shape == (1, 12, 6, 8)
    segments = model.native_segments(out.assignments)
    assert [tuple(s.shape) for s in segments] == [(1, 24, 32)] * 3
    assert segments[0].max() < 12 * 16 and segments[1].max() < 6 * 8 and segments[2].max() < 12
    assert torch.equal(segments[2], composed.argmax(1))
    with pytest.raises(ValueError, match="target_stage"):
        model.upsample_to_stage(identity, out.assignments, source_stage=2, target_stage=3)


def test_gradients_reach_every_grouping_parameter_through_all_iterations():
    torch.manual_seed(2)
    config = tiny_config(grouping_types=["local", "local", "dense"], num_labels=3, drop_path_rate=0.0)
    model = ns.SeNaTraForSemanticSegmentation(config)
    out = model(torch.randn(2, 3, 64, 96), labels=torch.randint(0, 3, (2, 64, 96)))
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient for {name}"

    # That every iteration passes gradients on (a detached iteration fails it) is tested against finite
    # differences in test_trustworthy.py.


def test_none_grouping_equals_strided_conv_downsampling():
    torch.manual_seed(3)
    layer = SeNaTraGroupingLayer(tiny_config(), 16, 32, "none")
    x = torch.randn(2, 8, 12, 16)
    out, assignment = layer(x)
    conv = F.conv2d(x.permute(0, 3, 1, 2), layer.init_conv.weight, layer.init_conv.bias, stride=2, padding=1)
    expected = F.layer_norm(conv.permute(0, 2, 3, 1), (32,), layer.init_norm.weight, layer.init_norm.bias, 1e-5)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(assignment.argmax(-1), torch.full((2, 8, 12), NEIGHBOUR_OFFSETS.index((0, 0))))
    assert not any(n.startswith(("key", "query", "value", "mlp")) for n, _ in layer.named_parameters())


@pytest.mark.parametrize("kind", ["local", "dense"])
def test_zero_init_residual_starts_grouping_as_strided_downsampling_and_then_learns(kind):
    def build(**kwargs):
        torch.manual_seed(4)
        return ns.SeNaTraForSemanticSegmentation(tiny_config(grouping_types=[kind] * 3, num_labels=3,
                                                             drop_path_rate=0.0, **kwargs))

    plain, zeroed = build(), build(grouping_zero_init_residual=True)
    changed = {k for k, v in zeroed.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    # Only the value projections and MLP outputs differ (zeros): every other weight is the same draw.
    assert changed == {f"senatra.encoder.stages.{i}.grouping.{name}.weight" for i in (1, 2, 3)
                       for name in ("value", "mlp.fc2")}
    layer = zeroed.senatra.encoder.stages[1].grouping
    x = torch.randn(2, 8, 12, layer.init_conv.in_channels)
    expected = layer.init_norm(layer.init_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    torch.testing.assert_close(layer(x)[0], expected, rtol=0, atol=0)
    # The zeroed weights get gradients, so the layer grows out of plain downsampling.
    zeroed(torch.randn(2, 3, 64, 96), labels=torch.randint(0, 3, (2, 64, 96))).loss.backward()
    assert layer.value.weight.grad.abs().sum() > 0 and layer.mlp.fc2.weight.grad.abs().sum() > 0


def test_bilinear_uniform_upsampling_resizes_the_strided_models_token_logits_bilinearly():
    """With `uniform_upsampling="bilinear"`, the native head of a model without grouping returns its final tokens'
    logits resized by 2x bilinear steps down to stride 4; "nearest" (the default) repeats them."""
    pixels = torch.randn(1, 3, 64, 96)
    for mode in ("nearest", "bilinear"):
        torch.manual_seed(4)
        model = ns.SeNaTraForSemanticSegmentation(tiny_config(grouping_types=["none"] * 3, num_labels=3,
                                                              uniform_upsampling=mode)).eval()
        with torch.no_grad():
            tokens = model.head(model.senatra(pixels).last_hidden_state.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            logits = model(pixels).logits
        if mode == "nearest":
            expected = tokens.repeat_interleave(8, 2).repeat_interleave(8, 3)
        else:
            expected = tokens
            for _ in range(3):
                expected = F.interpolate(expected, scale_factor=2, mode="bilinear", align_corners=False)
        torch.testing.assert_close(logits, expected)


def test_local_and_dense_bias_share_the_offset_convention():
    torch.manual_seed(4)
    local = SeNaTraGroupingLayer(tiny_config(), 16, 32, "local")
    dense = SeNaTraGroupingLayer(tiny_config(grouping_bias_radius=2), 16, 32, "dense")
    with torch.no_grad():
        local.relative_bias.normal_()
        dense.relative_bias.copy_(local.relative_bias)
    local_bias, dense_bias = local.position_bias(8, 8), dense.position_bias(8, 8)
    for y, x in [(2, 3), (5, 4), (7, 7)]:
        child = (y % 2) * 2 + x % 2
        for j, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
            oy, ox = y // 2 + dy, x // 2 + dx
            if 0 <= oy < 4 and 0 <= ox < 4:
                assert local_bias[child, j] == dense_bias[y * 8 + x, oy * 4 + ox]


def test_rotary_embedding_is_relative():
    torch.manual_seed(5)
    q, k = torch.randn(1, 10, 10, 1, 8), torch.randn(1, 10, 10, 1, 8)
    q, k = q[:, :1, :1].expand_as(q), k[:, :1, :1].expand_as(k)  # the same vectors at every position
    rq, rk = (apply_rotary_2d(t, rotary_embedding_2d(10, 10, 8, 100.0)) for t in (q, k))

    def score(p, r):
        return (rq[0, p[0], p[1], 0] * rk[0, r[0], r[1], 0]).sum()

    assert torch.allclose(score((1, 2), (4, 7)), score((3, 1), (6, 6)), atol=1e-5)  # same offset (3, 5)
    assert not torch.allclose(score((1, 2), (4, 7)), score((1, 2), (7, 4)), atol=1e-3)


def test_semantic_logits_loss_and_ignore_index():
    torch.manual_seed(6)
    model = ns.SeNaTraForSemanticSegmentation(tiny_config(num_labels=4)).eval()
    x = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 4, (2, 64, 96))
    out = model(x, labels=labels)
    assert out.logits.shape == (2, 4, 16, 24)
    upsampled = F.interpolate(out.logits, size=(64, 96), mode="bilinear", align_corners=False)
    assert torch.allclose(out.loss, F.cross_entropy(upsampled, labels), atol=1e-5)
    labels[:, :32] = 255
    ignored = model(x, labels=labels).loss
    assert torch.allclose(ignored, F.cross_entropy(upsampled, labels, ignore_index=255), atol=1e-5)
    as_tuple = model(x, return_dict=False)
    assert torch.equal(as_tuple[0], out.logits)


def test_semantic_training_step_reduces_loss():
    torch.manual_seed(7)
    model = ns.SeNaTraForSemanticSegmentation(tiny_config(num_labels=3, drop_path_rate=0.0))
    # Three regions of distinct colour; the model has to find and label them.
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, :, 24:], labels[1, 40:] = 1, 2
    colours = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [0.0, 0.0, -1.0]])
    x = colours[labels].permute(0, 3, 1, 2) + 0.3 * torch.randn(2, 3, 64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = model(x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_image_classification():
    model = ns.SeNaTraForImageClassification(tiny_config(num_labels=5)).eval()
    out = model(torch.randn(3, 3, 64, 64), labels=torch.tensor([0, 4, 2]))
    assert out.logits.shape == (3, 5) and out.loss.ndim == 0


@pytest.mark.parametrize("grouping_types", [["local", "local", "dense"], ["none", "none", "none"], ["local", "none", "dense"]])
def test_grouping_variants_run_and_stay_finite(grouping_types):
    model = ns.SeNaTraForSemanticSegmentation(tiny_config(grouping_types=grouping_types, num_labels=2)).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64)).logits
    assert logits.shape == (1, 2, 16, 16) and torch.isfinite(logits).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(8)
    model = ns.SeNaTraForSemanticSegmentation(tiny_config(num_labels=3, drop_path_rate=0.0))
    x, labels = torch.randn(1, 3, 64, 64), torch.randint(0, 3, (1, 64, 64))
    model(x, labels=labels).loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable()
    model.train()
    model(x, labels=labels).loss.backward()
    for ref, param in zip(reference, model.parameters()):
        assert torch.allclose(ref, param.grad, atol=1e-6)


# ---- Transformers integration ----


def test_auto_classes_resolve_to_senatra():
    config = tiny_config(num_labels=3)
    assert isinstance(AutoConfig.for_model("senatra", **TINY), ns.SeNaTraConfig)
    assert type(AutoModel.from_config(config)) is ns.SeNaTraModel
    assert type(AutoBackbone.from_config(config)) is ns.SeNaTraBackbone
    assert type(AutoModelForImageClassification.from_config(config)) is ns.SeNaTraForImageClassification
    assert type(AutoModelForSemanticSegmentation.from_config(config)) is ns.SeNaTraForSemanticSegmentation


def test_backbone_feature_maps():
    backbone = ns.SeNaTraBackbone(tiny_config(out_features=["stage1", "stage2", "stage3", "stage4"])).eval()
    assert backbone.channels == [16, 32, 48, 64]
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in out.feature_maps] == [(1, 16, 16, 24), (1, 32, 8, 12), (1, 48, 4, 6), (1, 64, 2, 3)]
    assert len(out.assignments) == 3 and out.hidden_states is None


def test_transformers_heads_on_senatra_backbone():
    backbone = tiny_config(out_features=["stage1", "stage2", "stage3", "stage4"])
    x = torch.randn(2, 3, 64, 64)  # batch 2: UperNet's pooling branch has BatchNorm on 1x1 maps
    upernet = UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone, num_labels=4, hidden_size=32, auxiliary_in_channels=48)
    )
    out = upernet(pixel_values=x, labels=torch.randint(0, 4, (2, 64, 64)))
    assert out.logits.shape == (2, 4, 64, 64)
    out.loss.backward()
    assert upernet.backbone.encoder.stages[1].grouping.key.weight.grad is not None
    m2f = Mask2FormerForUniversalSegmentation(
        Mask2FormerConfig(
            backbone_config=backbone, num_labels=4, num_queries=6, hidden_dim=32, feature_size=32,
            mask_feature_size=32, encoder_layers=1, decoder_layers=2, dim_feedforward=64,
        )
    ).eval()
    with torch.no_grad():
        out = m2f(pixel_values=x)
    assert out.masks_queries_logits.shape == (2, 6, 16, 16)
    assert out.class_queries_logits.shape == (2, 6, 5)


# ---- Hub round trips ----


def test_save_load_round_trip_is_exact_and_safetensors_only(tmp_path):
    torch.manual_seed(9)
    model = ns.SeNaTraForSemanticSegmentation(tiny_config(num_labels=3)).eval()
    x = torch.randn(1, 3, 64, 64)
    model.save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert {"configuration_senatra.py", "modeling_senatra.py", "grouping.py", "neighborhood_attention.py"} <= set(files)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    base = AutoModel.from_pretrained(tmp_path).eval()  # the head-less model from a task checkpoint
    with torch.no_grad():
        assert torch.equal(base(x).last_hidden_state, model.senatra(x).last_hidden_state)


def test_missing_weights_are_initialised_not_garbage(tmp_path):
    torch.manual_seed(10)
    model = ns.SeNaTraForSemanticSegmentation(tiny_config(num_labels=3, layer_scale_init_value=1e-5))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [k for k in weights if "relative_bias" in k or "attention_scale" in k or k.startswith("head.")]
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = ns.SeNaTraForSemanticSegmentation.from_pretrained(tmp_path)
    state = loaded.state_dict()
    for key in dropped:
        value = state[key]
        assert torch.isfinite(value).all(), f"{key} was not initialised"
        if "relative_bias" in key:  # the parent-cell prior, not garbage and not zeros
            layer = loaded.get_submodule(key.rsplit(".", 1)[0])
            assert torch.equal(value, layer.parent_bias_init(loaded.config.grouping_parent_bias))
        else:
            assert value.abs().max() < 1.0, f"{key} was not initialised"
        if "attention_scale" in key:
            assert torch.allclose(value, torch.full_like(value, 1e-5))


REMOTE_LOAD = textwrap.dedent(
    """
    import sys, torch
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    folder = sys.argv[1]
    x = torch.load(folder + "/x.pt")
    results = {}
    for auto in ["AutoModel", "AutoModelForSemanticSegmentation", "AutoBackbone", "AutoModelForImageClassification"]:
        if auto == "AutoBackbone":
            # transformers 5.23's AutoBackbone.from_pretrained rejects every local folder (it asks the Hub
            # whether the path is a repo id), so load the class its auto_map entry names directly.
            auto_map = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True).auto_map
            model = get_class_from_dynamic_module(auto_map[auto], folder).from_pretrained(folder).eval()
        else:
            # a classifier from a segmentation checkpoint keeps the backbone and starts a new head
            extra = {"change_head": True} if auto == "AutoModelForImageClassification" else {}
            model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True, **extra).eval()
        with torch.no_grad():
            out = model(pixel_values=x)
        results[auto] = (type(model).__name__, out[0] if not isinstance(out[0], tuple) else out[0][-1])
    torch.save(results, folder + "/remote.pt")
    """
)


def test_remote_code_loading_without_the_package(tmp_path, run_without_package):
    torch.manual_seed(11)
    model = ns.SeNaTraForSemanticSegmentation(tiny_config(num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    run_without_package(REMOTE_LOAD, tmp_path)
    results = torch.load(tmp_path / "remote.pt")
    with torch.no_grad():
        assert torch.equal(results["AutoModelForSemanticSegmentation"][1], model(x).logits)
        assert torch.equal(results["AutoModel"][1], model.senatra(x).last_hidden_state)
    assert results["AutoModel"][0] == "SeNaTraModel"
    assert results["AutoBackbone"][0] == "SeNaTraBackbone"
    assert results["AutoModelForImageClassification"][0] == "SeNaTraForImageClassification"


# ---- bad input ----


@pytest.mark.parametrize(
    "pixel_values,message",
    [
        (torch.randn(1, 1, 64, 64), "channels"),
        (torch.randn(1, 3, 64, 48), "multiples of 32"),
        (torch.randn(0, 3, 64, 64), "batch size 0"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
        (torch.randn(3, 64, 64), "shape"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating point"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_pixel_values_raise_value_error(pixel_values, message):
    model = ns.SeNaTraForSemanticSegmentation(tiny_config(num_labels=3))
    with pytest.raises(ValueError, match=message):
        model(pixel_values)


@pytest.mark.parametrize(
    "labels,message",
    [
        (torch.full((1, 64, 64), 3), "outside"),
        (torch.full((1, 64, 64), -1), "outside"),
        (torch.zeros(2, 64, 64, dtype=torch.long), "shape"),
        (torch.zeros(1, 64, 64), "integer"),
    ],
)
def test_bad_labels_raise_value_error(labels, message):
    model = ns.SeNaTraForSemanticSegmentation(tiny_config(num_labels=3))
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 64, 64), labels=labels)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(grouping_types=["local", "dense"]), "grouping_types"),
        (dict(grouping_types=["local", "local", "pool"]), "grouping_types"),
        (dict(num_heads=[1, 2, 3, 5]), "head width"),
        (dict(attention_kernel_size=4), "odd"),
        (dict(patch_size=3), "power of two"),
        (dict(depths=[1, 1, 1]), "one entry per stage"),
    ],
)
def test_bad_configs_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_presets():
    assert ns.SeNaTraConfig.from_preset("tiny").to_dict()["hidden_sizes"] == ns.SeNaTraConfig().hidden_sizes
    assert ns.SeNaTraConfig.from_preset("base", num_labels=7).hidden_sizes == [128, 256, 512, 1024]
    assert ns.SeNaTraConfig.from_preset("large").hidden_sizes[-1] == 1536
    with pytest.raises(ValueError, match="preset"):
        ns.SeNaTraConfig.from_preset("huge")
