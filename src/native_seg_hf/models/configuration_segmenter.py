"""Segmenter model configuration."""

from transformers import CONFIG_MAPPING, AutoConfig, Dinov2Config, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_senatra import SeNaTraConfig, loss_weights

DECODER_TYPES = ("linear", "mask_transformer")

# The backbone of `SegmenterConfig()`: the paper's ViT-S/16 shape (width 384, 12 layers, 6 heads of 64, MLP 4x,
# patch 16) as a Dinov2 encoder, with its position grid sized for the paper's 512x512 training crops.
DEFAULT_BACKBONE = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=16, image_size=512
)


def backbone_config_from_dict(config_dict: dict) -> PreTrainedConfig:
    """The config a serialised backbone config (with its `model_type`) describes.

    SeNaTra's config is resolved through the sibling module rather than `AutoConfig`, so that a saved Segmenter
    with a SeNaTra backbone also loads as remote code, where nothing has registered the `senatra` model type.
    """
    model_type = config_dict.get("model_type")
    if model_type == SeNaTraConfig.model_type:
        return SeNaTraConfig.from_dict(config_dict)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"backbone config has an unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(config_dict)


class SegmenterConfig(PreTrainedConfig):
    r"""
    Configuration of a Segmenter (Strudel et al., ICCV 2021): a linear or mask-transformer decoder over the patch
    tokens of a vision-transformer backbone. The defaults give Seg-S-Mask/16 (a ViT-S/16-shaped Dinov2 encoder,
    randomly initialised, and the paper's 2-layer mask transformer).

    The backbone is any config `AutoBackbone` builds a model from whose last feature map is a grid of patch tokens:
    `Dinov2Config`, `Dinov2WithRegistersConfig`, `DINOv3ViTConfig`, ... (transformers 5.23 has no ViT backbone, so a
    `ViTConfig` is refused when the model is built), or a `SeNaTraConfig`, whose native assignments then carry the
    logits back to stride 4 instead of bilinear upsampling. Give it either as `backbone_config`, or as `backbone`, a
    checkpoint (a local folder, or a Hub id when online) whose `config.json` is read; with
    `use_pretrained_backbone=True` the model also loads that checkpoint's weights into its backbone.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*): the backbone's config (a dict needs its
            `model_type`). Defaults to the config stored at `backbone`, else to the ViT-S/16-shaped Dinov2 config.
        backbone (`str`, *optional*): checkpoint of a pretrained backbone model (e.g. a saved `Dinov2Model`). Kept
            in saved configs as a record of where the encoder came from.
        use_pretrained_backbone (`bool`, defaults to `False`): load the weights of `backbone` when the model is
            built. Saved Segmenter checkpoints carry those weights themselves, so `save_pretrained` writes `False`.
        decoder_type (`str`, defaults to `"mask_transformer"`): `"linear"` (one linear layer on each patch token) or
            `"mask_transformer"` (learned class embeddings processed jointly with the patch tokens; masks are the
            cosine similarities of patches and classes, LayerNorm-ed over the classes).
        decoder_num_layers (`int`, defaults to 2): transformer layers of the mask transformer.
        decoder_hidden_size (`int`, *optional*): width of the mask transformer; defaults to the width of the
            backbone feature map it reads.
        decoder_num_attention_heads (`int`, *optional*): heads of the mask transformer; defaults to its width / 64.
        decoder_mlp_ratio (`float`, defaults to 4.0): MLP width over token width in the mask transformer.
        decoder_dropout (`float`, defaults to 0.1): dropout of the mask transformer's attention and MLP (the paper's
            code keeps 0.1 in the decoder while the encoder runs without dropout).
        hidden_act (`str`, defaults to `"gelu"`): activation of the mask transformer's MLPs.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the decoder's LayerNorms.
        initializer_range (`float`, defaults to 0.02): std of the truncated normal initialisation of the decoder's
            linear layers and class embeddings.
        semantic_loss_ignore_index (`int`, defaults to 255): label ignored by the loss.
        semantic_loss_weights (`list[float]`, *optional*): one weight per class for the cross-entropy (averaged
            over the labelled pixels' weights); `None` weighs every class alike.
    """

    model_type = "segmenter"
    # Declared so that settings meant for every sub-model (such as `attn_implementation`) reach the backbone.
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2")}

    def __init__(
        self,
        backbone_config=None,
        backbone=None,
        use_pretrained_backbone=False,
        decoder_type="mask_transformer",
        decoder_num_layers=2,
        decoder_hidden_size=None,
        decoder_num_attention_heads=None,
        decoder_mlp_ratio=4.0,
        decoder_dropout=0.1,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        semantic_loss_ignore_index=255,
        semantic_loss_weights=None,
        **kwargs,
    ):
        if use_pretrained_backbone and backbone is None:
            raise ValueError("use_pretrained_backbone=True needs `backbone`, the checkpoint to load the weights from")
        # Not `transformers.backbone_utils.consolidate_backbone_kwargs_to_config`: for `backbone` it asks the Hub
        # whether the repository exists (a network call even for a local folder) and otherwise takes it for a timm
        # model name. Reading the checkpoint's own config works offline for folders and online for Hub ids.
        if backbone_config is None and backbone is not None:
            backbone_config, _ = PreTrainedConfig.get_config_dict(backbone)
        if backbone_config is None:
            backbone_config = Dinov2Config(**DEFAULT_BACKBONE)
        elif isinstance(backbone_config, dict):
            backbone_config = backbone_config_from_dict(backbone_config)
        elif not isinstance(backbone_config, PreTrainedConfig):
            raise ValueError(f"backbone_config must be a config or a dict, got {type(backbone_config).__name__}")
        if getattr(backbone_config, "reshape_hidden_states", True) is False:
            raise ValueError("the backbone must return feature maps (B, C, h, w): set reshape_hidden_states=True")
        if decoder_type not in DECODER_TYPES:
            raise ValueError(f"decoder_type must be one of {DECODER_TYPES}, got {decoder_type!r}")
        if decoder_num_layers < 1:
            raise ValueError(f"decoder_num_layers must be >= 1, got {decoder_num_layers}")

        self.backbone_config = backbone_config
        self.backbone = backbone
        self.use_pretrained_backbone = use_pretrained_backbone
        self.decoder_type = decoder_type
        self.decoder_num_layers = decoder_num_layers
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_mlp_ratio = decoder_mlp_ratio
        self.decoder_dropout = decoder_dropout
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.semantic_loss_ignore_index = semantic_loss_ignore_index
        self.semantic_loss_weights = loss_weights(semantic_loss_weights)
        super().__init__(**kwargs)


__all__ = ["SegmenterConfig"]
