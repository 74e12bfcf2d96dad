"""Processor of `SeNaTraForZeroShotSegmentation`: SeNaTra's image processor plus the text tower's tokenizer, the
class-name prompts of zero-shot segmentation, and its post-processing.

This file imports only siblings (single-dot) and installed packages, so it travels as remote code.
"""

import torch
from transformers.processing_utils import ProcessorMixin


class SeNaTraZeroShotProcessor(ProcessorMixin):
    r"""
    Wraps a `SeNaTraImageProcessor` and a tokenizer into one processor, saved beside the model
    (`processor.save_pretrained(folder)`), as `CLIPProcessor` does for CLIP.

    - `processor(images=..., text=..., padding=True, return_tensors="pt")`: pixel values and token ids for training
      (one caption per image) or retrieval.
    - `label_inputs(candidate_labels, prompt_templates)`: the tokenised prompts of every label under every template
      (label by label), for `SeNaTraForZeroShotSegmentation.get_label_embeddings`.
    - `post_process_zero_shot_segmentation(outputs, target_sizes, background_threshold)`: label maps at the
      original image sizes, and image-level label probabilities.

    Args:
        image_processor (`SeNaTraImageProcessor`): resizes, normalises and pads images.
        tokenizer: the text tower's tokenizer (any `AutoTokenizer`).
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    def label_inputs(self, candidate_labels: list[str], prompt_templates: list[str], return_tensors="pt"):
        """Tokenised prompts for `candidate_labels`: `len(prompt_templates)` consecutive prompts per label."""
        if isinstance(candidate_labels, str):
            candidate_labels = [candidate_labels]
        if not candidate_labels:
            raise ValueError("candidate_labels is empty: give at least one label")
        prompts = [template.format(label) for label in candidate_labels for template in prompt_templates]
        return self.tokenizer(prompts, padding=True, truncation=True, return_tensors=return_tensors)

    def post_process_zero_shot_segmentation(self, outputs, target_sizes, background_threshold: float | None = None):
        """Zero-shot label maps at the original image sizes.

        Args:
            outputs: `SeNaTraForZeroShotSegmentation.segment`'s output (`logits` (B, L, h, w) scaled cosine
                similarities, `logits_per_image` (B, L), `logit_scale`).
            target_sizes: the original (height, width) of every image of the batch.
            background_threshold (*optional*): pixels whose best cosine similarity is below this are background
                (-1), for datasets with a background class (GroupViT's rule). None: every pixel gets a label.

        Returns:
            One dict per image: `segmentation` ((H, W) int64: the index of the label of each pixel, -1 for
            background), `probabilities` ((L, H, W): softmax over labels of each pixel's logits) and `scores`
            ((L,): softmax over labels of the image-level logits, what zero-shot image classification reports).
        """
        logits = outputs.logits
        geometry = self.image_processor._geometry_of(target_sizes, logits)
        results = []
        for i, image in enumerate(geometry):
            # Bilinear resampling of the logits is linear, so dividing by the scale still gives cosine similarity.
            pixel_logits = image.to_original(logits[i : i + 1])[0]
            segmentation = pixel_logits.argmax(0)
            if background_threshold is not None:
                best_cosine = pixel_logits.max(0).values / outputs.logit_scale
                segmentation = torch.where(best_cosine < background_threshold, -1, segmentation)
            results.append({
                "segmentation": segmentation,
                "probabilities": pixel_logits.softmax(0),
                "scores": outputs.logits_per_image[i].float().softmax(-1),
            })
        return results


__all__ = ["SeNaTraZeroShotProcessor"]
