"""Configuration of SeNaTra paired with a text encoder, for text-supervised (zero-shot) segmentation."""

import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_senatra import SeNaTraConfig

# ImageNet-style prompts (a few of CLIP's 80), ensembled per class at zero-shot time as GroupViT does.
DEFAULT_PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of many {}.",
    "a good photo of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "itap of a {}.",
)


class SeNaTraZeroShotConfig(PreTrainedConfig):
    r"""
    Configuration of `SeNaTraForZeroShotSegmentation`: a SeNaTra vision tower, any Transformers text encoder, and
    the projections into their shared embedding space.

    Build it from two configs (`SeNaTraZeroShotConfig(vision_config=SeNaTraConfig.from_preset("nano"),
    text_config=AutoConfig.from_pretrained(text_folder))`), or let
    `SeNaTraForZeroShotSegmentation.from_vision_text_pretrained(vision=..., text=...)` do it with weights.

    Args:
        vision_config (`SeNaTraConfig` or `dict`, *optional*): the vision tower (defaults to SeNaTra-Tiny).
        text_config (`PreTrainedConfig` or `dict`, *optional*): the text tower, any model `AutoModel` builds
            (defaults to a BERT-base config).
        projection_dim (`int`, defaults to 256): width of the shared embedding space.
        logit_scale_init_value (`float`, defaults to log(1/0.07)): initial log temperature of the contrastive
            logits (CLIP's), learnable.
        text_pooling (`str`, defaults to `"mean"`): how the text tower's tokens become one text embedding:
            `"mean"` (masked mean over tokens, what sentence-transformers models such as all-MiniLM-L6-v2 were
            trained with), `"first"` (the first token, BERT's [CLS]) or `"pooler"` (the text model's
            `pooler_output`).
        multi_label_loss_weight (`float`, defaults to 0.0): weight of GroupViT's multi-label contrastive loss
            (image against prompts made from nouns of its caption, several positives per image); 0 turns it off.
        prompt_templates (`list[str]`, *optional*): templates with one `{}` for the class name; zero-shot
            segmentation averages a label's embedding over all of them. Defaults to ten ImageNet-style prompts.
        background_threshold (`float`, *optional*): default cosine similarity below which a pixel is
            background in zero-shot post-processing (for datasets with a background class); None: every pixel
            gets its best label.
    """

    model_type = "senatra_zero_shot"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=SeNaTraConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        projection_dim=256,
        logit_scale_init_value=math.log(1 / 0.07),
        text_pooling="mean",
        multi_label_loss_weight=0.0,
        prompt_templates=None,
        background_threshold=None,
        **kwargs,
    ):
        if vision_config is None:
            vision_config = SeNaTraConfig()
        elif isinstance(vision_config, dict):
            vision_config = SeNaTraConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        if text_config is None:
            text_config = AutoConfig.for_model("bert")
        elif isinstance(text_config, dict):
            settings = dict(text_config)
            text_config = AutoConfig.for_model(settings.pop("model_type", "bert"), **settings)
        if text_pooling not in ("mean", "first", "pooler"):
            raise ValueError(f"text_pooling must be 'mean', 'first' or 'pooler', got {text_pooling!r}")
        templates = list(prompt_templates) if prompt_templates is not None else list(DEFAULT_PROMPT_TEMPLATES)
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(f"prompt_templates need one '{{}}' each (for the class name), got {bad or templates}")
        self.vision_config = vision_config
        self.text_config = text_config
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value
        self.text_pooling = text_pooling
        self.multi_label_loss_weight = multi_label_loss_weight
        self.prompt_templates = templates
        self.background_threshold = background_threshold
        super().__init__(**kwargs)

    @classmethod
    def from_vision_text_configs(cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs):
        """As in `VisionTextDualEncoderConfig`: the config of a pair of towers with (copies of) the given configs."""
        return cls(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), **kwargs)

    @property
    def input_size_divisor(self) -> int:
        """Input height and width must be multiples of this (the vision tower's last stride)."""
        return self.vision_config.input_size_divisor


__all__ = ["SeNaTraZeroShotConfig", "DEFAULT_PROMPT_TEMPLATES"]
