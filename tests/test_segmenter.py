"""Segmenter: both decoders on a Dinov2 (ViT-family) and a SeNaTra backbone, pretrained-encoder loading, save/load
and remote code, input validation, and a few training steps on real CamVid images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSemanticSegmentation, Dinov2Config, Dinov2Model, ViTConfig

from native_seg_hf import SegmenterConfig, SegmenterForSemanticSegmentation, SeNaTraConfig, SeNaTraModel

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
CAMVID_VOID = 11

# Patch 8 and SeNaTra's stride-32 last stage: the test inputs below are multiples of neither, so forward pads.
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=8, image_size=32)
TINY_SENATRA = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4])
BACKBONES = {"dinov2": lambda: Dinov2Config(**TINY_DINOV2), "senatra": lambda: SeNaTraConfig(**TINY_SENATRA)}
DECODERS = ("linear", "mask_transformer")


def make_model(backbone: str, decoder: str, num_labels: int = 5, **kwargs) -> SegmenterForSemanticSegmentation:
    torch.manual_seed(0)
    config = SegmenterConfig(
        backbone_config=BACKBONES[backbone](), decoder_type=decoder, num_labels=num_labels, **kwargs
    )
    return SegmenterForSemanticSegmentation(config).eval()


def logits_of(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_logits_at_input_size_and_padding_cropped(backbone, decoder):
    model = make_model(backbone, decoder)
    x = torch.randn(2, 3, 45, 70)
    logits = logits_of(model, x)
    assert logits.shape == (2, 5, 45, 70)
    assert torch.isfinite(logits).all()
    # The model zero-pads bottom/right to whole patches and crops the padding off: the same as padding by hand.
    divisor = 8 if backbone == "dinov2" else 32
    padded = F.pad(x, (0, -70 % divisor, 0, -45 % divisor))
    torch.testing.assert_close(logits, logits_of(model, padded)[..., :45, :70])

    labels = torch.randint(0, 5, (2, 45, 70))
    labels[:, :5] = 255
    out = model(pixel_values=x, labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # Labels at another size: the logits are resized to them for the loss.
    assert torch.isfinite(model(pixel_values=x, labels=labels[:, ::2, ::2]).loss)


def test_mask_transformer_has_the_paper_defaults():
    with torch.device("meta"):  # structure only: the ViT-S/16 default need not be initialised
        model = SegmenterForSemanticSegmentation(SegmenterConfig(num_labels=150))
    decoder = model.decoder
    assert model.backbone.channels[-1] == 384 and model.config.backbone_config.patch_size == 16
    assert len(decoder.layers) == 2 and decoder.hidden_size == 384
    assert decoder.layers[0].attention.num_heads == 384 // 64
    assert decoder.class_embeddings.shape == (1, 150, 384)
    assert decoder.mask_norm.normalized_shape == (150,)


def test_mask_transformer_scores_cosine_similarities_normalised_over_classes():
    model = make_model("dinov2", "mask_transformer", num_labels=7)
    scores = {}
    model.decoder.mask_norm.register_forward_hook(lambda module, args, out: scores.update(cosine=args[0]))
    logits = logits_of(model, torch.randn(1, 3, 40, 48))
    assert scores["cosine"].abs().max() <= 1 + 1e-5
    assert scores["cosine"].std() > 0.05  # not all orthogonal
    # At initialisation the LayerNorm over classes centres every pixel's logits (bilinear upsampling keeps that).
    torch.testing.assert_close(logits.mean(dim=1), torch.zeros(1, 40, 48), atol=1e-5, rtol=0)
    assert logits.std(dim=1).mean() > 0.5


def test_senatra_logits_travel_through_the_assignments():
    model = make_model("senatra", "mask_transformer")
    x = torch.randn(1, 3, 64, 96)
    coarse = {}
    model.decoder.register_forward_hook(lambda module, args, out: coarse.update(logits=out))
    logits = logits_of(model, x)
    assert coarse["logits"].shape[-2:] == (2, 3)  # stage 4, stride 32
    with torch.no_grad():
        assignments = model.backbone(x).assignments
        stride4 = model.backbone.upsample_to_stage(coarse["logits"], assignments, source_stage=4)
    expected = F.interpolate(stride4, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, expected)
    plain = F.interpolate(coarse["logits"], size=(64, 96), mode="bilinear", align_corners=False)
    assert (logits - plain).abs().max() > 1e-2


def test_pretrained_dinov2_encoder_loads_exactly(tmp_path):
    config = Dinov2Config(**TINY_DINOV2)
    torch.manual_seed(1)
    Dinov2Model(config).save_pretrained(tmp_path / "encoder")
    reference = Dinov2Model.from_pretrained(tmp_path / "encoder").eval()

    torch.manual_seed(2)  # different from the encoder's seed: nothing may match by chance
    segmenter_config = SegmenterConfig(backbone=str(tmp_path / "encoder"), use_pretrained_backbone=True, num_labels=4)
    model = SegmenterForSemanticSegmentation(segmenter_config).eval()
    assert isinstance(model.config.backbone_config, Dinov2Config)
    backbone_state = model.backbone.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(backbone_state[name], tensor), name

    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        tokens = reference(pixel_values=x).last_hidden_state[:, 1:]
        features = model.backbone(x).feature_maps[-1]
    assert torch.equal(features, tokens.reshape(2, 4, 6, 32).permute(0, 3, 1, 2))
    assert_decoder_initialised(model)


def test_pretrained_senatra_encoder_loads(tmp_path):
    torch.manual_seed(1)
    encoder = SeNaTraModel(SeNaTraConfig(**TINY_SENATRA))
    encoder.save_pretrained(tmp_path / "encoder")
    torch.manual_seed(2)
    config = SegmenterConfig(backbone=str(tmp_path / "encoder"), use_pretrained_backbone=True, num_labels=4)
    model = SegmenterForSemanticSegmentation(config)
    backbone_state = model.backbone.state_dict()
    # SeNaTraModel's final LayerNorm has no counterpart in the backbone (it norms each output stage itself).
    shared = {k: v for k, v in encoder.state_dict().items() if not k.startswith("layernorm.")}
    assert shared and all(torch.equal(backbone_state[k], v) for k, v in shared.items())
    assert_decoder_initialised(model)


def assert_decoder_initialised(model):
    decoder = model.decoder
    for name, tensor in decoder.state_dict().items():
        assert torch.isfinite(tensor).all() and tensor.abs().max() < 10, name
    assert 0.015 < decoder.class_embeddings.std() < 0.025
    expected = decoder.hidden_size**-0.5
    for proj in (decoder.patch_proj, decoder.class_proj):
        assert 0.8 * expected < proj.weight.std() < 1.2 * expected
    assert 0.015 < decoder.input_proj.weight.std() < 0.025 and torch.all(decoder.input_proj.bias == 0)
    assert torch.all(decoder.mask_norm.weight == 1) and torch.all(decoder.mask_norm.bias == 0)


def test_checkpoint_without_decoder_initialises_it(tmp_path):
    model = make_model("dinov2", "mask_transformer")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("decoder.")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    reloaded = SegmenterForSemanticSegmentation.from_pretrained(tmp_path)
    assert_decoder_initialised(reloaded)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in reloaded.backbone.state_dict().items())


def test_save_and_reload_without_the_pretrained_encoder_folder(tmp_path):
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(**TINY_DINOV2)).save_pretrained(tmp_path / "encoder")
    config = SegmenterConfig(backbone=str(tmp_path / "encoder"), use_pretrained_backbone=True, decoder_type="linear")
    model = SegmenterForSemanticSegmentation(config).eval()
    model.save_pretrained(tmp_path / "segmenter")
    saved = json.loads((tmp_path / "segmenter" / "config.json").read_text())
    assert saved["use_pretrained_backbone"] is False and saved["backbone"] == str(tmp_path / "encoder")
    assert model.config.use_pretrained_backbone  # only the saved copy changes

    (tmp_path / "encoder" / "model.safetensors").unlink()  # the checkpoint must carry the encoder itself
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "segmenter").eval()
    assert type(reloaded) is SegmenterForSemanticSegmentation
    x = torch.randn(1, 3, 30, 41)
    torch.testing.assert_close(logits_of(reloaded, x), logits_of(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_save_and_reload_round_trip(tmp_path, backbone):
    model = make_model(backbone, "mask_transformer", id2label={i: f"class{i}" for i in range(5)})
    model.save_pretrained(tmp_path)
    reloaded = SegmenterForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(reloaded.config.backbone_config) is type(model.config.backbone_config)
    assert reloaded.config.id2label[3] == "class3"
    x = torch.randn(1, 3, 50, 70)
    torch.testing.assert_close(logits_of(reloaded, x), logits_of(model, x), rtol=0, atol=0)


REMOTE_LOAD = """
import sys, torch
from transformers import AutoModel, AutoModelForSemanticSegmentation

for folder in sys.argv[1:]:
    for auto_class in (AutoModel, AutoModelForSemanticSegmentation):
        model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
        x, expected = torch.load(folder + "/x.pt"), torch.load(folder + "/y.pt")
        with torch.no_grad():
            diff = (model(pixel_values=x).logits - expected).abs().max().item()
        print(type(model).__module__, diff)
"""


def test_remote_code_loads_where_the_package_cannot_be_imported(tmp_path, run_without_package):
    folders = []
    for backbone, decoder in (("dinov2", "linear"), ("senatra", "mask_transformer")):
        model, folder = make_model(backbone, decoder), tmp_path / backbone
        model.save_pretrained(folder)
        x = torch.randn(1, 3, 40, 72)
        torch.save(x, folder / "x.pt")
        torch.save(logits_of(model, x), folder / "y.pt")
        folders.append(str(folder))
    assert (tmp_path / "senatra" / "modeling_senatra.py").exists()

    result = run_without_package(REMOTE_LOAD, *folders)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4  # two folders, each through AutoModel and AutoModelForSemanticSegmentation
    for line in lines:
        module, diff = line.split()
        assert module.startswith("transformers_modules.") and float(diff) < 1e-5, line


@pytest.mark.parametrize(
    "pixel_values",
    [
        [[[0.0]]],  # not a tensor
        torch.randn(3, 32, 32),  # no batch dimension
        torch.randn(1, 1, 32, 32),  # wrong number of channels
        torch.zeros(1, 3, 32, 32, dtype=torch.long),  # not floating point
        torch.full((1, 3, 32, 32), float("nan")),
        torch.randn(0, 3, 32, 32),  # empty batch
    ],
    ids=["list", "3d", "channels", "integer", "nan", "empty"],
)
def test_bad_pixel_values_raise(pixel_values):
    with pytest.raises(ValueError):
        make_model("dinov2", "linear")(pixel_values=pixel_values)


@pytest.mark.parametrize(
    "labels",
    [torch.zeros(2, 32, 32, dtype=torch.long), torch.zeros(1, 32, 32), torch.full((1, 32, 32), 5)],
    ids=["batch", "float", "out_of_range"],
)
def test_bad_labels_raise(labels):
    with pytest.raises(ValueError):
        make_model("dinov2", "linear")(pixel_values=torch.randn(1, 3, 32, 32), labels=labels)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(decoder_type="conv"),
        dict(use_pretrained_backbone=True),  # no checkpoint named
        dict(backbone_config=5),
        dict(backbone_config={"model_type": "no_such_model"}),
        dict(backbone_config=Dinov2Config(**TINY_DINOV2, reshape_hidden_states=False)),
        dict(decoder_num_layers=0),
    ],
    ids=["decoder_type", "pretrained_without_backbone", "config_type", "model_type", "token_sequence", "layers"],
)
def test_bad_configs_raise(kwargs):
    with pytest.raises(ValueError):
        SegmenterConfig(**kwargs)


def test_backbones_without_patch_grid_or_bad_decoder_width_raise():
    # transformers 5.23 has no ViT backbone class: Dinov2 and its relatives are the ViT family it offers.
    with pytest.raises(ValueError, match="no backbone class"):
        SegmenterForSemanticSegmentation(SegmenterConfig(backbone_config=ViTConfig()))
    with pytest.raises(ValueError, match="attention heads"):
        make_model("dinov2", "mask_transformer", decoder_num_attention_heads=3)


def load_camvid(count: int, size=(96, 128)):
    if not CAMVID.is_dir():
        pytest.skip(f"CamVid not found at {CAMVID} (the shared data folder is absent)")
    names = sorted((CAMVID / "train" / "images").glob("*.jpg"))[:count]
    images, labels = [], []
    for name in names:
        image = Image.open(name).convert("RGB").resize(size[::-1], Image.BILINEAR)
        label = Image.open(CAMVID / "train" / "labels" / f"{name.stem}.png").resize(size[::-1], Image.NEAREST)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0)  # mean = std = 0.5
        label = torch.from_numpy(np.array(label, dtype=np.int64))
        labels.append(label.masked_fill(label == CAMVID_VOID, 255))
    return torch.stack(images), torch.stack(labels)


@pytest.mark.parametrize(
    "backbone, decoder", [("dinov2", "linear"), ("dinov2", "mask_transformer"), ("senatra", "mask_transformer")]
)
def test_a_few_training_steps_on_camvid_reduce_the_loss(backbone, decoder):
    images, labels = load_camvid(4)
    model = make_model(backbone, decoder, num_labels=11)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(pixel_values=images, labels=labels).loss.item()

    before = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(12):
        loss = model(pixel_values=images, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)
