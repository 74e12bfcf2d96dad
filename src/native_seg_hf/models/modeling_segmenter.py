"""PyTorch Segmenter: Transformer for Semantic Segmentation (Strudel, Garcia, Laptev, Schmid, ICCV 2021).

A decoder over the patch tokens of a vision-transformer backbone. The linear decoder classifies each token; the
mask transformer appends one learned embedding per class to the tokens, runs a few transformer layers over the
joint sequence, and scores each patch against each class by the cosine similarity of their projections, with a
LayerNorm over the classes learning the logit scale. Patch-grid logits are upsampled to the input: bilinearly, or
for a SeNaTra backbone through its grouping assignments down to stride 4 first (the native upsampling).

Inputs of any size are zero-padded (bottom and right) to whole patches, as in the paper's code, and the padding is
cropped off the logits, which come back at the input's resolution. Images much larger than the training crops
are best segmented by sliding windows: that belongs to the image processor, not to this model.

Reading order: backbone construction -> decoder layers -> the two decoders -> the model.
"""


import torch
import torch.nn.functional as F
from torch import nn
from transformers import MODEL_FOR_BACKBONE_MAPPING, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES
from transformers.utils import can_return_tuple

from .configuration_segmenter import SegmenterConfig
from .configuration_senatra import SeNaTraConfig
from .modeling_senatra import SeNaTraBackbone, check_pixel_values, check_semantic_labels, semantic_cross_entropy


def is_senatra(backbone_config) -> bool:
    # By model type, not isinstance: as remote code, the config module and this one are loaded from separate copies
    # of the folder, each importing its own `configuration_senatra`, so there are two SeNaTraConfig classes.
    return backbone_config.model_type == SeNaTraConfig.model_type


def build_backbone(config: SegmenterConfig) -> PreTrainedModel:
    """The backbone `config.backbone_config` describes, holding the weights of the checkpoint `config.backbone` when
    `config.use_pretrained_backbone` is set (`load_backbone` in transformers 5.23 ignores that flag)."""
    backbone_config = config.backbone_config
    # The concrete class rather than `AutoBackbone.from_pretrained`, which (in 5.23) asks the Hub whether the
    # checkpoint exists even when it is a local folder, and takes it for a timm model otherwise. SeNaTra's class comes
    # from the sibling module, so that this also works as remote code, where nothing has registered SeNaTra.
    if is_senatra(backbone_config):
        backbone_class = SeNaTraBackbone
    elif type(backbone_config) in MODEL_FOR_BACKBONE_MAPPING:
        backbone_class = MODEL_FOR_BACKBONE_MAPPING[type(backbone_config)]
    else:
        raise ValueError(
            f"{type(backbone_config).__name__} has no backbone class (AutoBackbone); Segmenter needs a ViT-family "
            "backbone such as Dinov2Config, Dinov2WithRegistersConfig or DINOv3ViTConfig, or a SeNaTraConfig"
        )
    if config.use_pretrained_backbone:
        return backbone_class.from_pretrained(config.backbone, config=backbone_config)
    return backbone_class(backbone_config)


class SegmenterAttention(nn.Module):
    """Multi-head self-attention over the joint sequence of patch tokens and class embeddings (no masking)."""

    def __init__(self, config: SegmenterConfig, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = config.decoder_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(config.decoder_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, c = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_dropout(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class SegmenterDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer of the mask transformer: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: SegmenterConfig, dim: int, num_heads: int):
        super().__init__()
        hidden = int(dim * config.decoder_mlp_ratio)
        self.attention_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = SegmenterAttention(config, dim, num_heads)
        self.mlp_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            ACT2FN[config.hidden_act],
            nn.Dropout(config.decoder_dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(config.decoder_dropout),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(self.attention_norm(hidden_states))
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class SegmenterLinearDecoder(nn.Module):
    """One linear layer on each patch token: (B, C, h, w) features -> (B, num_labels, h, w) logits."""

    def __init__(self, config: SegmenterConfig, encoder_width: int):
        super().__init__()
        self.classifier = nn.Linear(encoder_width, config.num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SegmenterMaskTransformer(nn.Module):
    """The mask transformer: (B, C, h, w) features -> (B, num_labels, h, w) logits.

    Patch tokens (projected to the decoder width) and one learned embedding per class go through
    `decoder_num_layers` transformer layers together; after a LayerNorm, patches and classes are projected and
    L2-normalised, so each patch's score for a class is a cosine similarity in [-1, 1]. `mask_norm`, a LayerNorm over
    the classes of each patch, then sets the scale of the logits (the model has no temperature).
    """

    def __init__(self, config: SegmenterConfig, encoder_width: int):
        super().__init__()
        dim = config.decoder_hidden_size or encoder_width
        num_heads = config.decoder_num_attention_heads or max(dim // 64, 1)
        if dim % num_heads:
            raise ValueError(f"the mask transformer's width {dim} does not divide into {num_heads} attention heads")
        self.hidden_size = dim
        self.num_labels = config.num_labels
        self.input_proj = nn.Linear(encoder_width, dim)
        self.class_embeddings = nn.Parameter(torch.zeros(1, config.num_labels, dim))
        self.layers = nn.ModuleList(
            SegmenterDecoderLayer(config, dim, num_heads) for _ in range(config.decoder_num_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.patch_proj = nn.Linear(dim, dim, bias=False)
        self.class_proj = nn.Linear(dim, dim, bias=False)
        self.mask_norm = nn.LayerNorm(config.num_labels, eps=config.layer_norm_eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        patches = self.input_proj(features.flatten(2).transpose(1, 2))
        hidden_states = torch.cat([patches, self.class_embeddings.expand(b, -1, -1)], dim=1)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        hidden_states = self.norm(hidden_states)
        patches, classes = hidden_states[:, : -self.num_labels], hidden_states[:, -self.num_labels :]
        patches = F.normalize(self.patch_proj(patches), dim=-1)
        classes = F.normalize(self.class_proj(classes), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, h*w, num_labels)
        return masks.reshape(b, h, w, self.num_labels).permute(0, 3, 1, 2)


class SegmenterPreTrainedModel(PreTrainedModel):
    config_class = SegmenterConfig
    config: SegmenterConfig
    base_model_prefix = "segmenter"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SegmenterDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        # Linear layers and LayerNorms get the library's default rule: weights normal with std `initializer_range`
        # (the paper's truncated normal cuts at +-2, a hundred std out: the same distribution), zero biases, unit
        # norms. The backbone is a pretrained model of its own and is initialised by its own `_init_weights`.
        super()._init_weights(module)
        if isinstance(module, SegmenterMaskTransformer):
            # Runs after the rule for its Linear children, so it overrides it for the projections: the paper draws
            # them as randn / sqrt(width). Their scale cancels in the L2 normalisation; it sets the gradients' scale.
            init.trunc_normal_(module.class_embeddings, std=self.config.initializer_range)
            init.normal_(module.patch_proj.weight, std=module.hidden_size**-0.5)
            init.normal_(module.class_proj.weight, std=module.hidden_size**-0.5)


class SegmenterForSemanticSegmentation(SegmenterPreTrainedModel):
    """Segmenter: a linear or mask-transformer decoder (`config.decoder_type`) on the last feature map of a ViT-family
    or SeNaTra backbone. Logits come back at the input's resolution; with `labels`, the loss is the cross-entropy
    against them (logits bilinearly resized to the labels' size if it differs), ignoring
    `config.semantic_loss_ignore_index`."""

    accepts_loss_kwargs = False

    def __init__(self, config: SegmenterConfig):
        super().__init__(config)
        self.backbone = build_backbone(config)
        backbone_config = config.backbone_config
        encoder_width = self.backbone.channels[-1]
        if config.decoder_type == "linear":
            self.decoder = SegmenterLinearDecoder(config, encoder_width)
        else:
            self.decoder = SegmenterMaskTransformer(config, encoder_width)
        if is_senatra(backbone_config):
            # Stage l tokens sit on a grid of stride patch_size * 2^(l-1); inputs must divide by the last stage's.
            # The assignments carry the logits from the stage the decoder reads back to stage 1 (`stem` has stage
            # 1's grid).
            self.size_divisor = (backbone_config.input_size_divisor,) * 2
            self.assignment_stage = max(backbone_config.stage_names.index(self.backbone.out_features[-1]), 1)
        else:
            patch_size = backbone_config.patch_size
            self.size_divisor = (patch_size,) * 2 if isinstance(patch_size, int) else tuple(patch_size)
            self.assignment_stage = None
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        # The backbone's weights are saved with the rest of the model, so the saved config must not ask for them to be
        # loaded (or downloaded) again when the checkpoint is reloaded; `backbone` stays as the record of their origin.
        use_pretrained_backbone = self.config.use_pretrained_backbone
        self.config.use_pretrained_backbone = False
        # Both Auto classes load the folder as remote code (custom_object_save only adds the saving class's one).
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": "configuration_segmenter.SegmenterConfig",
            "AutoModel": "modeling_segmenter.SegmenterForSemanticSegmentation",
            "AutoModelForSemanticSegmentation": "modeling_segmenter.SegmenterForSemanticSegmentation",
        }
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.use_pretrained_backbone = use_pretrained_backbone

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, labels: torch.LongTensor | None = None, output_hidden_states=None, **kwargs
    ) -> SemanticSegmenterOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): any height and
            width; they are zero-padded to a multiple of the backbone's patch size (for SeNaTra, of its last stage's
            stride) and the padding is cropped off the logits.
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*): class index per pixel,
            `config.semantic_loss_ignore_index` where unlabelled.
        """
        check_pixel_values(pixel_values, self.config.backbone_config.num_channels)  # any size: forward pads
        height, width = pixel_values.shape[-2:]
        padded = F.pad(pixel_values, (0, -width % self.size_divisor[1], 0, -height % self.size_divisor[0]))
        outputs = self.backbone(padded, output_hidden_states=output_hidden_states)
        logits = self.decoder(outputs.feature_maps[-1])
        if self.assignment_stage is not None:
            logits = self.backbone.upsample_to_stage(logits, outputs.assignments, self.assignment_stage)
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        logits = logits[..., :height, :width]

        loss = None
        if labels is not None:
            ignore = self.config.semantic_loss_ignore_index
            check_semantic_labels(labels, logits.shape[0], self.config.num_labels, ignore)
            loss = semantic_cross_entropy(logits, labels, ignore, self.config.semantic_loss_weights)
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


# Named for pipeline("image-segmentation")'s check, as in modeling_senatra.py (which says why).
MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES[SegmenterConfig.model_type] = (SegmenterForSemanticSegmentation.__name__,)

__all__ = ["SegmenterPreTrainedModel", "SegmenterForSemanticSegmentation"]
