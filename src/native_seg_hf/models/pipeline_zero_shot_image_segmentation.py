"""The `zero-shot-image-segmentation` pipeline: one mask and one score per candidate label.

    from transformers import pipeline
    segmenter = pipeline("zero-shot-image-segmentation", model=folder, trust_remote_code=True)
    segmenter(photo, candidate_labels=["road", "sky", "car"])   # [{"label", "score", "mask"}, ...]

`import native_seg_hf` registers it with Transformers' pipeline registry; a saved `SeNaTraForZeroShotSegmentation`
folder names it in its config (`custom_pipelines`) and carries this file, so the call above also works where
native_seg_hf is not installed. This file imports only installed packages (it travels as remote code).
"""

import numpy as np
from PIL import Image
from transformers.image_utils import load_image
from transformers.pipelines.base import Pipeline

PIPELINE_TASK = "zero-shot-image-segmentation"


class ZeroShotImageSegmentationPipeline(Pipeline):
    """Segments an image into the given candidate labels with a text-supervised model (no mask training):
    `SeNaTraForZeroShotSegmentation` with its `SeNaTraZeroShotProcessor`.

    Every label is embedded with the prompt templates (the model's `config.prompt_templates`, or
    `prompt_templates=[...]`), each pixel gets the label its group token is most similar to, and each label's score
    is the softmax over labels of the image-level similarities, as in `zero-shot-image-classification`.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __call__(self, image, candidate_labels: list[str] | None = None, **kwargs):
        """
        Args:
            image (`str`, `PIL.Image` or a list of them): a path, URL or image.
            candidate_labels (`list[str]`): the labels to segment into.
            prompt_templates (`list[str]`, *optional*): templates with one `{}` for the label (ensembled); `["{}"]`
                uses the labels as they are.
            background_threshold (`float`, *optional*): pixels whose best cosine similarity is below this belong to
                no label (defaults to the model config's `background_threshold`).
            timeout (`float`, *optional*): for fetching images from the web.

        Returns:
            One list per image (a single image: the list itself) of dicts `{"score", "label", "mask"}`, one per
            candidate label, highest score first; `mask` is a PIL image ("L", 255 where the label is) of the
            image's size.
        """
        if not candidate_labels:
            raise ValueError("zero-shot-image-segmentation needs candidate_labels, e.g. ['road', 'sky', 'car']")
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)

    def _sanitize_parameters(self, candidate_labels=None, prompt_templates=None, background_threshold=None, timeout=None):
        preprocess = {"candidate_labels": candidate_labels, "timeout": timeout}
        if prompt_templates is not None:
            preprocess["prompt_templates"] = list(prompt_templates)
        postprocess = {}
        if background_threshold is not None:
            postprocess["background_threshold"] = background_threshold
        return preprocess, {}, postprocess

    def preprocess(self, image, candidate_labels=None, prompt_templates=None, timeout=None):
        image = load_image(image, timeout=timeout)
        templates = prompt_templates or self.model.config.prompt_templates
        inputs = dict(self.processor.image_processor(images=[image], return_tensors="pt"))
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        inputs.pop("pixel_mask", None)
        inputs["label_inputs"] = self.processor.label_inputs(list(candidate_labels), templates)
        inputs["num_templates"] = len(templates)
        inputs["candidate_labels"] = list(candidate_labels)
        inputs["image_size"] = (image.height, image.width)
        return inputs

    def _forward(self, model_inputs):
        label_inputs = model_inputs.pop("label_inputs")
        label_embeds = self.model.get_label_embeddings(**label_inputs, num_templates=model_inputs.pop("num_templates"))
        outputs = self.model.segment(model_inputs.pop("pixel_values"), label_embeds)
        return {"outputs": outputs, **model_inputs}

    def postprocess(self, model_outputs, background_threshold=None):
        if background_threshold is None:
            background_threshold = self.model.config.background_threshold
        result = self.processor.post_process_zero_shot_segmentation(
            model_outputs["outputs"], [model_outputs["image_size"]], background_threshold
        )[0]
        segmentation = result["segmentation"].cpu().numpy()
        answers = [
            {
                "score": float(score),
                "label": label,
                "mask": Image.fromarray(((segmentation == index) * 255).astype(np.uint8)),
            }
            for index, (label, score) in enumerate(zip(model_outputs["candidate_labels"], result["scores"].tolist()))
        ]
        return sorted(answers, key=lambda answer: -answer["score"])


__all__ = ["ZeroShotImageSegmentationPipeline", "PIPELINE_TASK"]
