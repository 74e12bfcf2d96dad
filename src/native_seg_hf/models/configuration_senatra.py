"""SeNaTra model configuration."""

import math
from numbers import Integral, Real

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneConfigMixin

# Named sizes. Tiny/Base/Large follow the brief (NAT-T/B and DiNAT-L widths, which match the paper's
# final-stage widths 512/1024/1536); Mini/Small are NAT's; Nano is a small model for CPU training.
SENATRA_PRESETS = {
    "nano": dict(hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 4, 2], num_heads=[1, 2, 4, 8], mlp_ratio=3.0),
    # Nano without its stride-32 stage (those blocks join stage 3): the native head labels tokens at stride 16,
    # four times as many as at stride 32, for a CPU-sized model. Both of its grouping layers are local: a dense
    # last layer learned less on both 128x160 CamVid recipes, over seeds, and costs 66% more FLOPs at 352x480. One
    # grouping iteration instead of 3 learned more over three seeds and makes the training step 30% shorter
    # (README: "Does grouping earn its place?").
    "nano-s16": dict(hidden_sizes=[32, 64, 128], depths=[1, 2, 6], num_heads=[1, 2, 4], mlp_ratio=3.0,
                     grouping_types=["local", "local"], grouping_iterations=1),
    "mini": dict(hidden_sizes=[64, 128, 256, 512], depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], mlp_ratio=3.0),
    "tiny": dict(hidden_sizes=[64, 128, 256, 512], depths=[3, 4, 18, 5], num_heads=[2, 4, 8, 16], mlp_ratio=3.0),
    "small": dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 4, 18, 5], num_heads=[3, 6, 12, 24], mlp_ratio=2.0,
                  drop_path_rate=0.3, layer_scale_init_value=1e-5),
    "base": dict(hidden_sizes=[128, 256, 512, 1024], depths=[3, 4, 18, 5], num_heads=[4, 8, 16, 32], mlp_ratio=2.0,
                 drop_path_rate=0.5, layer_scale_init_value=1e-5),
    "large": dict(hidden_sizes=[192, 384, 768, 1536], depths=[3, 4, 18, 5], num_heads=[6, 12, 24, 48],
                  mlp_ratio=2.0, drop_path_rate=0.5, layer_scale_init_value=1e-5),
}

GROUPING_TYPES = ("local", "dense", "none")
UNIFORM_UPSAMPLING = ("nearest", "bilinear")  # the keys of grouping.UNIFORM_ASSIGNMENTS


def int_list(name: str, value) -> list[int]:
    """`value` as a list of positive ints, or a ValueError naming the field `name`."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of positive integers (one per stage), got {value!r}")
    if not all(isinstance(v, Integral) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ValueError(f"{name} must be a list of positive integers (one per stage), got {list(value)}")
    return [int(v) for v in value]


def check_number(name: str, value, low: float, high: float = math.inf, integer: bool = False,
                 low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Raise a ValueError naming the field `name` unless `value` is a finite number (an int if `integer`) within
    [low, high] (bounds exclusive where asked)."""
    kind = Integral if integer else Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low) and (value <= high if high_inclusive else value < high)
    if not ok:
        lo, hi = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} in {lo}{low}, {high}{hi}, got {value!r}")


def loss_weights(value) -> list[float] | None:
    """`semantic_loss_weights` as a list of non-negative floats (or None), or a ValueError naming the field."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"semantic_loss_weights must be None or a list of one weight per class, got {value!r}")
    for weight in value:
        check_number("each of semantic_loss_weights", weight, 0)
    return [float(weight) for weight in value]


class SeNaTraConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a SeNaTra (Native Segmentation Vision Transformer) model. The defaults give SeNaTra-Tiny.
    Other sizes: `SeNaTraConfig.from_preset("base", num_labels=150)`; names in `SENATRA_PRESETS`
    (`nano`, `nano-s16`, `mini`, `tiny`, `small`, `base`, `large`; `nano-s16` has three stages, final stride 16).

    Args:
        num_channels (`int`, defaults to 3): channels of the input image.
        patch_size (`int`, defaults to 4): stride of the convolutional stem (a power of two); stage 1 runs at
            this stride and every later stage at twice the stride of the one before.
        hidden_sizes (`list[int]`): token width of each stage.
        depths (`list[int]`): number of transformer blocks in each stage.
        num_heads (`list[int]`): attention heads in each stage; `hidden_size / num_heads` must be a multiple of 4
            (2D rotary embedding rotates pairs along each axis).
        mlp_ratio (`float`, defaults to 3.0): MLP width over token width, in the blocks and the grouping layers.
        attention_kernel_size (`int`, defaults to 7): side of the neighbourhood each token attends to (odd).
            A stage whose grid is no larger than the kernel attends globally.
        rope_theta (`float`, defaults to 100.0): base of the 2D axial rotary position embedding.
        grouping_types (`list[str]`): one per stage transition: `"local"` (each token joins one of the 9
            output tokens around its parent cell), `"dense"` (any output token), `"none"` (plain strided-conv
            downsampling, the paper's ablation).
        grouping_iterations (`int`, defaults to 3): refinement rounds of each grouping layer.
        grouping_bias_radius (`int`, defaults to 16): relative offsets (in input tokens) beyond which a dense
            grouping layer's relative position bias is shared (local layers never reach it).
        grouping_parent_bias (`float`, defaults to 5.0): initial relative position bias of each input token
            towards its parent cell's output token (0 elsewhere). At 0 a fresh layer assigns every token almost
            uniformly to all its candidates (a dense layer to the whole image), so the native head starts by
            averaging logits over the image and cannot learn; at 5 it starts as plain strided downsampling (95%
            on the parent in local layers) and learns where to move from there.
        grouping_logit_scale (`float`, *optional*, defaults to 10.0): the assignment logits are the cosine
            similarity of queries and keys times a learnable per-layer scale initialised to this value (the
            inverse temperature). `None` uses the scaled dot product `q.k / sqrt(d)` instead, whose logits start
            near 0 and grow only as fast as the projection weights do.
        grouping_zero_init_residual (`bool`, defaults to `False`): start each grouping layer's value projection and
            the output layer of its MLP at zero, so that a new layer computes exactly the strided downsampling of
            the ablation (its convolution and LayerNorm) and what it adds grows from there, as torchvision's
            `zero_init_residual` starts a ResNet's residual branches. The other weights are drawn as without it.
        uniform_upsampling (`str`, defaults to `"nearest"`): how values come back through a `"none"` transition
            (the native head's logits, segment maps): `"nearest"`, every token takes its parent cell's (the
            grouping layer with its refinement removed, as in the paper's ablation), or `"bilinear"`, 2x bilinear
            interpolation, as decoders upsample the logits of strided backbones. Grouping transitions ignore it.
        drop_path_rate (`float`, defaults to 0.2): stochastic depth rate, increased linearly over the blocks.
        layer_scale_init_value (`float`, defaults to 0.0): initial layer-scale; 0 disables layer scale.
        hidden_act (`str`, defaults to `"gelu"`): activation of the MLPs.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the LayerNorms.
        initializer_range (`float`, defaults to 0.02): std of the truncated normal weight initialisation.
        head_hidden_size (`int`, defaults to 512): hidden width of the native 2-layer MLP segmentation head.
        semantic_loss_ignore_index (`int`, defaults to 255): label ignored by the semantic loss.
        semantic_loss_weights (`list[float]`, *optional*): one weight per class for the semantic cross-entropy
            (averaged over the labelled pixels' weights); `None` weighs every class alike. `scripts/train.py
            --class_weighting enet` sets it from the training labels.
        num_queries (`int`, defaults to 100): learnable queries of the universal-segmentation model (EoMT uses
            100 for semantic and 200 for panoptic/instance segmentation).
        num_blocks (`int`, defaults to 4): final-stage blocks that process the queries (universal model; at most
            the last stage's depth).
        class_weight, mask_weight, dice_weight (`float`, defaults to 2.0, 5.0, 5.0): weights of the
            classification, mask (sigmoid BCE) and dice losses of the universal model, and of the matcher costs.
        no_object_weight (`float`, defaults to 0.1): weight of the no-object class in the classification loss.
        train_num_points (`int`, defaults to 12544), oversample_ratio (`float`, defaults to 3.0),
            importance_sample_ratio (`float`, defaults to 0.75): point sampling of the mask losses
            (Mask2Former's).
        out_features (`list[str]`, *optional*): stages the backbone returns, from `stage_names`
            (`"stem"`, `"stage1"` ... `"stage4"`, strides 4, 4, 8, 16, 32). Defaults to the last stage.
        out_indices (`list[int]`, *optional*): the same as indices into `stage_names` (`"stem"` is index 0).
    """

    model_type = "senatra"

    def __init__(
        self,
        num_channels=3,
        patch_size=4,
        hidden_sizes=(64, 128, 256, 512),
        depths=(3, 4, 18, 5),
        num_heads=(2, 4, 8, 16),
        mlp_ratio=3.0,
        attention_kernel_size=7,
        rope_theta=100.0,
        grouping_types=("local", "local", "dense"),
        grouping_iterations=3,
        grouping_bias_radius=16,
        grouping_parent_bias=5.0,
        grouping_logit_scale=10.0,
        grouping_zero_init_residual=False,
        uniform_upsampling="nearest",
        drop_path_rate=0.2,
        layer_scale_init_value=0.0,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        head_hidden_size=512,
        semantic_loss_ignore_index=255,
        semantic_loss_weights=None,
        num_queries=100,
        num_blocks=4,
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        no_object_weight=0.1,
        train_num_points=12544,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        out_features=None,
        out_indices=None,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.patch_size = patch_size
        # Checked before list() so that a string such as "wide" is refused, not split into characters.
        self.hidden_sizes = int_list("hidden_sizes", hidden_sizes)
        self.depths = int_list("depths", depths)
        self.num_heads = int_list("num_heads", num_heads)
        self.mlp_ratio = mlp_ratio
        self.attention_kernel_size = attention_kernel_size
        self.rope_theta = rope_theta
        if isinstance(grouping_types, str) or not isinstance(grouping_types, (list, tuple)):
            raise ValueError(f"grouping_types must be a list of {GROUPING_TYPES}, got {grouping_types!r}")
        self.grouping_types = list(grouping_types)
        self.grouping_iterations = grouping_iterations
        self.grouping_bias_radius = grouping_bias_radius
        self.grouping_parent_bias = grouping_parent_bias
        self.grouping_logit_scale = grouping_logit_scale
        self.grouping_zero_init_residual = grouping_zero_init_residual
        self.uniform_upsampling = uniform_upsampling
        self.drop_path_rate = drop_path_rate
        self.layer_scale_init_value = layer_scale_init_value
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.head_hidden_size = head_hidden_size
        self.semantic_loss_ignore_index = semantic_loss_ignore_index
        self.semantic_loss_weights = loss_weights(semantic_loss_weights)
        self.num_queries = num_queries
        self.num_blocks = num_blocks
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.no_object_weight = no_object_weight
        self.train_num_points = train_num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        self._validate_architecture()
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "SeNaTraConfig":
        """A config of a named size (`SENATRA_PRESETS`), with any field overridden by `kwargs`."""
        if name not in SENATRA_PRESETS:
            raise ValueError(f"Unknown SeNaTra preset {name!r}; choose one of {sorted(SENATRA_PRESETS)}")
        return cls(**{**SENATRA_PRESETS[name], **kwargs})

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def input_size_divisor(self) -> int:
        """Input height and width must be multiples of this (the stride of the last stage)."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    def _validate_architecture(self):
        n = len(self.depths)
        if not (len(self.hidden_sizes) == len(self.num_heads) == n) or n < 1:
            raise ValueError(
                f"hidden_sizes, depths and num_heads need one entry per stage, got {self.hidden_sizes}, "
                f"{self.depths}, {self.num_heads}"
            )
        if len(self.grouping_types) != n - 1:
            raise ValueError(f"grouping_types needs {n - 1} entries (one per stage transition), got {self.grouping_types}")
        bad = [g for g in self.grouping_types if g not in GROUPING_TYPES]
        if bad:
            raise ValueError(f"grouping_types must be among {GROUPING_TYPES}, got {bad}")
        for width, heads in zip(self.hidden_sizes, self.num_heads):
            if width % heads or (width // heads) % 4:
                raise ValueError(
                    f"hidden size {width} with {heads} heads: the head width must be an integer multiple of 4 "
                    "(2D rotary embedding)"
                )
        check_number("attention_kernel_size", self.attention_kernel_size, 1, integer=True)
        if self.attention_kernel_size % 2 == 0:
            raise ValueError(f"attention_kernel_size must be odd and positive, got {self.attention_kernel_size}")
        check_number("patch_size", self.patch_size, 2, integer=True)
        if self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_size must be a power of two >= 2, got {self.patch_size}")
        # Every other field: its type and range, so that a bad value fails here, naming the field, rather than
        # as an unrelated error deep in the model (or, worse, as a model that builds and computes nonsense).
        for name in ("num_channels", "grouping_iterations", "head_hidden_size", "num_queries", "num_blocks",
                     "train_num_points"):
            check_number(name, getattr(self, name), 1, integer=True)
        check_number("grouping_bias_radius", self.grouping_bias_radius, 0, integer=True)
        check_number("semantic_loss_ignore_index", self.semantic_loss_ignore_index, -math.inf, integer=True)
        for name in ("mlp_ratio", "rope_theta", "layer_norm_eps"):
            check_number(name, getattr(self, name), 0, low_inclusive=False)
        for name in ("layer_scale_init_value", "initializer_range", "class_weight", "mask_weight", "dice_weight",
                     "no_object_weight"):
            check_number(name, getattr(self, name), 0)
        check_number("drop_path_rate", self.drop_path_rate, 0, 1, high_inclusive=False)
        check_number("oversample_ratio", self.oversample_ratio, 1)  # Mask2Former samples at least num_points
        check_number("importance_sample_ratio", self.importance_sample_ratio, 0, 1)
        if not callable(self.hidden_act) and self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act must be one of transformers' activations (ACT2FN), got {self.hidden_act!r}")
        check_number("grouping_parent_bias", self.grouping_parent_bias, -math.inf)
        if self.grouping_logit_scale is not None:
            check_number("grouping_logit_scale", self.grouping_logit_scale, 0, low_inclusive=False)
        if not isinstance(self.grouping_zero_init_residual, bool):
            raise ValueError(
                f"grouping_zero_init_residual must be True or False, got {self.grouping_zero_init_residual!r}"
            )
        if self.uniform_upsampling not in UNIFORM_UPSAMPLING:
            raise ValueError(f"uniform_upsampling must be one of {UNIFORM_UPSAMPLING}, got {self.uniform_upsampling!r}")


__all__ = ["SeNaTraConfig", "SENATRA_PRESETS"]
