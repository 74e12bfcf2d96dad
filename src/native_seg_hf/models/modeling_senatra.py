"""PyTorch SeNaTra: the Native Segmentation Vision Transformer (Brasó, Ošep, Leal-Taixé, NeurIPS 2025).

A 4-stage hierarchical ViT (NAT-style neighbourhood attention with 2D rotary embedding) whose between-stage
downsampling is a *spatial grouping layer*: output tokens start as a strided convolution of the input and are
refined by a few rounds of soft K-means-like assignment. The soft assignments (row-stochastic `A_ups`) chain
like a Markov process, so values on the final stage's tokens can be carried back to stride 4 (and pixels)
without a decoder: that is the native segmentation head.

Reading order: stem -> rotary embedding -> attention block -> grouping layer -> stage/encoder -> models.
Tokens are channels-last (B, H, W, C) inside the model; feature maps in outputs are channels-first.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, ImageClassifierOutputWithNoAttention, SemanticSegmenterOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES
from scipy.optimize import linear_sum_assignment
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerHungarianMatcher,
    Mask2FormerLoss,
    pair_wise_dice_loss,
    pair_wise_sigmoid_cross_entropy_loss,
    sample_point,
)
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_senatra import SeNaTraConfig
from .grouping import (
    UNIFORM_ASSIGNMENTS,
    dense_bias_index,
    dense_grouping_step,
    hard_segments,
    local_grouping_step,
    local_relative_offsets,
    relative_bias_index,
    upsample_through,
)
from .neighborhood_attention import neighborhood_attention


@dataclass
class SeNaTraModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size, height/32, width/32)`):
            Final-stage tokens after the final LayerNorm.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`): mean of the final tokens.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the stem output and the output of every stage,
            channels-first, in `config.stage_names` order; returned with `output_hidden_states=True`.
        assignments (`tuple(torch.FloatTensor)`): one soft assignment per stage transition, row-stochastic
            (`A_ups`): `(batch_size, H_l, W_l, 9)` for local and "none" transitions (weights of the 9 output
            tokens around each token's parent cell) and `(batch_size, H_l, W_l, H_l/2 * W_l/2)` for dense ones.
            Use `model.upsample_to_stage` and `model.native_segments` rather than reading them by hand.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    assignments: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SeNaTraBackboneOutput(BackboneOutput):
    """`BackboneOutput` plus `assignments` (as in `SeNaTraModelOutput`), so heads on a SeNaTra backbone can
    carry their predictions back to stride 4 with `backbone.upsample_to_stage`."""

    assignments: tuple[torch.FloatTensor, ...] | None = None


def check_pixel_values(pixel_values, num_channels: int, size_divisor: int = 1) -> None:
    """Raise a ValueError naming the problem for inputs a model cannot take (sides must be multiples of
    `size_divisor`)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}")
    batch, channels, height, width = pixel_values.shape
    if batch == 0:
        raise ValueError("pixel_values is an empty batch (batch size 0)")
    if channels != num_channels:
        raise ValueError(f"pixel_values has {channels} channels but the model expects {num_channels}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a floating point tensor, got {pixel_values.dtype}")
    if height == 0 or width == 0 or height % size_divisor or width % size_divisor:
        raise ValueError(
            f"pixel_values height and width must be positive multiples of {size_divisor}, got {height}x{width}; "
            "pad the image (SeNaTraImageProcessor does) or resize it"
        )
    if not torch.compiler.is_compiling() and not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values contains NaN or infinite values")


class SeNaTraEmbeddings(nn.Module):
    """Convolutional stem: log2(patch_size) overlapping 3x3 stride-2 convolutions, then LayerNorm.

    NAT's tokenizer rather than a 4x4 patchify conv: SeNaTra is built on NAT, and overlapping kernels let the
    stride-4 tokens (the finest unit native masks are made of) see across patch borders, for about 2% of the
    Tiny model's compute.
    """

    def __init__(self, config: SeNaTraConfig):
        super().__init__()
        width = config.hidden_sizes[0]
        n_convs = int(math.log2(config.patch_size))
        widths = [config.num_channels] + [width // 2] * (n_convs - 1) + [width]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1) for c_in, c_out in zip(widths, widths[1:])
        )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Channels-last convolutions: on a CPU oneDNN runs them about 2.5x faster than on NCHW here, and the tokens
        # come out (B, H, W, C)-contiguous, so the permute below is free.
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        for conv in self.convs:
            x = conv(x)
        return self.norm(x.permute(0, 2, 3, 1))


def rotary_embedding_2d(height: int, width: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """The 2D axial rotary embedding of an (H, W) grid as unit complex numbers, (H, W, 1, head_dim / 2).

    Channels (2k, 2k + 1) of a head form pair k; the first half of the pairs rotates with the row index, the
    second half with the column index, at frequencies theta^(-j / n), j < n = head_dim / 4. The middle axis
    broadcasts over heads. Computed once per stage and shared by its blocks.
    """
    n = head_dim // 4
    freqs = theta ** (-torch.arange(n, device=device, dtype=torch.float32) / n)
    angle_y = torch.arange(height, device=device, dtype=torch.float32)[:, None, None] * freqs  # (H, 1, n)
    angle_x = torch.arange(width, device=device, dtype=torch.float32)[None, :, None] * freqs  # (1, W, n)
    angles = torch.cat([angle_y.expand(height, width, n), angle_x.expand(height, width, n)], dim=-1)[:, :, None, :]
    # Shaped before it becomes complex: ONNX export handles complex multiplies but not reshapes of complex tensors.
    return torch.polar(torch.ones_like(angles), angles)


def rotary_embedding_sequence(
    height: int, width: int, head_dim: int, theta: float, num_leading: int, device=None
) -> torch.Tensor:
    """The rotary embedding of the sequence [`num_leading` position-free entries; the (H, W) grid row-major], as
    (num_leading + H*W, 1, head_dim / 2) unit complex numbers: angle 0 (exactly 1 + 0j, so no rotation) for the
    leading entries (the universal model's queries), the grid's angles from `rotary_embedding_2d` for the rest."""
    n = head_dim // 4
    freqs = theta ** (-torch.arange(n, device=device, dtype=torch.float32) / n)
    angle_y = torch.arange(height, device=device, dtype=torch.float32)[:, None, None] * freqs
    angle_x = torch.arange(width, device=device, dtype=torch.float32)[None, :, None] * freqs
    grid = torch.cat([angle_y.expand(height, width, n), angle_x.expand(height, width, n)], dim=-1)
    angles = torch.cat([grid.new_zeros(num_leading, 2 * n), grid.reshape(height * width, 2 * n)])[:, None, :]
    # Shaped before it becomes complex, as in `rotary_embedding_2d` (ONNX export).
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_2d(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, *positions, ..., head_dim) by `rotation` (*positions, 1, head_dim / 2), from `rotary_embedding_2d`
    (positions H, W) or `rotary_embedding_sequence` (positions L), in one complex multiply: the axes between the
    positions and the channels (e.g. query/key and heads) share a position's rotation."""
    positions = rotation.dim() - 2
    # Those axes are merged into one on the real tensor (a view for slices of a projection's output) rather than the
    # rotation indexed to broadcast: ONNX export cannot reshape or index complex tensors.
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:1 + positions], -1, x.shape[-1] // 2, 2))
    return torch.view_as_real(pairs * rotation).reshape(x.shape).type_as(x)


class SeNaTraAttention(nn.Module):
    """Multi-head self-attention with 2D rotary position embedding: neighbourhood attention over a token grid, or
    global attention over a token sequence.

    The sequence form serves the universal model's query blocks, where the learnable queries and the grid tokens
    attend globally over the joint sequence [queries; tokens] (queries have no position: their rotation is the
    identity, see `rotary_embedding_sequence`); `attention_mask` (B, 1, L, L) bool, True = may attend, masks it.
    """

    def __init__(self, config: SeNaTraConfig, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = config.attention_kernel_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, rotation: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """(B, H, W, C) grid -> (B, H, W, C), `rotation` from `rotary_embedding_2d`; or (B, L, C) sequence ->
        (B, L, C), `rotation` from `rotary_embedding_sequence`."""
        if hidden_states.dim() == 3:
            return self.attend_sequence(hidden_states, rotation, attention_mask)
        b, h, w, c = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(b, h, w, 3, self.num_heads, self.head_dim)
        # Rotate queries and keys in one multiply while channels are still contiguous, then move heads forward:
        # (B, heads, H, W, head_dim).
        query, key = apply_rotary_2d(qkv[:, :, :, :2], rotation).permute(3, 0, 4, 1, 2, 5)
        value = qkv[:, :, :, 2].permute(0, 3, 1, 2, 4)
        out = neighborhood_attention(query, key, value, self.kernel_size)
        # A view when the attention already wrote (B, H, W, heads, head_dim), as its PyTorch path does.
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c))

    def attend_sequence(self, hidden_states: torch.Tensor, rotation: torch.Tensor, attention_mask=None) -> torch.Tensor:
        b, length, c = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(b, length, 3, self.num_heads, self.head_dim)
        query, key = apply_rotary_2d(qkv[:, :, :2], rotation).permute(2, 0, 3, 1, 4)  # (B, heads, L, d)
        out = F.scaled_dot_product_attention(query, key, qkv[:, :, 2].transpose(1, 2), attn_mask=attention_mask)
        return self.proj(out.transpose(1, 2).reshape(b, length, c))


class SeNaTraMlp(nn.Module):
    def __init__(self, config: SeNaTraConfig, dim: int):
        super().__init__()
        hidden = int(dim * config.mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SeNaTraDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class SeNaTraLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)), with optional layer scale."""

    def __init__(self, config: SeNaTraConfig, dim: int, num_heads: int, drop_path: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = SeNaTraAttention(config, dim, num_heads)
        self.mlp_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = SeNaTraMlp(config, dim)
        self.drop_path = SeNaTraDropPath(drop_path)
        use_scale = config.layer_scale_init_value > 0
        self.attention_scale = nn.Parameter(torch.ones(dim)) if use_scale else None
        self.mlp_scale = nn.Parameter(torch.ones(dim)) if use_scale else None

    def residual(self, x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        return x + self.drop_path(branch if scale is None else branch * scale)

    def forward(self, hidden_states: torch.Tensor, rotation: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """(B, H, W, C) token grid, or (B, L, C) sequence such as the universal model's [queries; tokens] (see
        `SeNaTraAttention`) -> the same shape."""
        attended = self.attention(self.attention_norm(hidden_states), rotation, attention_mask)
        hidden_states = self.residual(hidden_states, attended, self.attention_scale)
        return self.residual(hidden_states, self.mlp(self.mlp_norm(hidden_states)), self.mlp_scale)


class SeNaTraGroupingLayer(nn.Module):
    """Spatial grouping layer: downsamples an (H, W) token grid to (H/2, W/2) by soft clustering.

    Output tokens are initialised by a 3x3 stride-2 convolution (+ LayerNorm; with `kind="none"` that is
    all there is: NAT's downsampler, the paper's "uniform downsampling" ablation, whose fixed assignment is
    nearest or bilinear un-pooling, `uniform_upsampling`), then refined
    `grouping_iterations` times:
        logits  = s cos(q(LN(X_out)), k(LN(X_in))) + relative position bias   (restricted for "local")
        A_ups   = softmax over output tokens, per input token
        X_out  += A_down^T v(LN(X_in))       with A_down = A_ups / column sums (a weighted mean)
        X_out  += MLP(LN(X_out))
    "local": each input token may join only the 9 output tokens around its parent cell (memory linear in
    the number of tokens); "dense": any output token. s is a learnable inverse temperature
    (`grouping_logit_scale`; with None the logits are q.k / sqrt(d)), and the bias starts with
    `grouping_parent_bias` on the parent cell, so a new layer behaves like strided downsampling and learns
    from there where boundaries should move (README: "Does grouping earn its place?").
    """

    def __init__(self, config: SeNaTraConfig, in_dim: int, out_dim: int, kind: str):
        super().__init__()
        self.kind = kind
        self.iterations = config.grouping_iterations
        self.init_conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.init_norm = nn.LayerNorm(out_dim, eps=config.layer_norm_eps)
        if kind == "none":
            self.uniform_assignment = UNIFORM_ASSIGNMENTS[config.uniform_upsampling]
            return
        self.input_norm = nn.LayerNorm(in_dim, eps=config.layer_norm_eps)
        self.key = nn.Linear(in_dim, out_dim)
        self.value = nn.Linear(in_dim, out_dim)
        self.query_norm = nn.LayerNorm(out_dim, eps=config.layer_norm_eps)
        self.query = nn.Linear(out_dim, out_dim)
        self.mlp_norm = nn.LayerNorm(out_dim, eps=config.layer_norm_eps)
        self.mlp = SeNaTraMlp(config, out_dim)
        # Assignment logits: cosine similarity times a learnable inverse temperature (kept as its log, so it
        # stays positive), or, with `grouping_logit_scale=None`, the scaled dot product.
        self.cosine = config.grouping_logit_scale is not None
        self.scale = out_dim**-0.5
        self.log_logit_scale = nn.Parameter(torch.zeros(())) if self.cosine else None
        # Learned bias per relative offset (input token vs. output cell origin, in input tokens), offsets
        # clipped to [-radius, radius + 1]. Local offsets always lie in [-2, 3], so radius 2 is exact there.
        self.bias_radius = 2 if kind == "local" else config.grouping_bias_radius
        self.relative_bias = nn.Parameter(torch.zeros((2 * self.bias_radius + 2) ** 2))

    def parent_bias_init(self, value: float) -> torch.Tensor:
        """The relative bias table that puts `value` on the parent cell (offsets 0 and 1 on both axes), 0 elsewhere."""
        side = 2 * self.bias_radius + 2
        table = torch.zeros(side, side)
        table[self.bias_radius : self.bias_radius + 2, self.bias_radius : self.bias_radius + 2] = value
        return table.flatten()

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return F.normalize(keys, dim=-1) if self.cosine else keys

    def project_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries multiplied by the temperature, as the grouping step expects them."""
        if self.cosine:
            return F.normalize(queries, dim=-1) * self.log_logit_scale.exp()
        return queries * self.scale

    def position_bias(self, height: int, width: int) -> torch.Tensor:
        """(4, 9) for local layers, (H*W, H/2*W/2) for dense ones."""
        device = self.relative_bias.device
        if self.kind == "local":
            return self.relative_bias[relative_bias_index(local_relative_offsets(device), self.bias_radius)]
        return self.relative_bias[dense_bias_index(height, width, self.bias_radius, device)]

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> output tokens (B, H/2, W/2, D) and the assignment of the last iteration."""
        b, height, width, _ = hidden_states.shape
        out = self.init_norm(self.init_conv(hidden_states.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        if self.kind == "none":
            return out, self.uniform_assignment(b, height, width, out.device, out.dtype)
        tokens = self.input_norm(hidden_states)
        keys, values = self.project_keys(self.key(tokens)), self.value(tokens)
        bias = self.position_bias(height, width)
        step = local_grouping_step if self.kind == "local" else dense_grouping_step
        for _ in range(self.iterations):
            queries = self.project_queries(self.query(self.query_norm(out)))
            update, assignment = step(keys, values, queries, bias)
            out = out + update
            out = out + self.mlp(self.mlp_norm(out))
        return out, assignment


class SeNaTraStage(nn.Module):
    """A stage: the grouping layer from the previous stage (none for the first), then transformer blocks."""

    def __init__(self, config: SeNaTraConfig, index: int, drop_paths: list[float]):
        super().__init__()
        dim = config.hidden_sizes[index]
        self.grouping = (
            SeNaTraGroupingLayer(config, config.hidden_sizes[index - 1], dim, config.grouping_types[index - 1])
            if index > 0
            else None
        )
        self.layers = nn.ModuleList(
            SeNaTraLayer(config, dim, config.num_heads[index], drop_path) for drop_path in drop_paths
        )
        self.head_dim = dim // config.num_heads[index]
        self.rope_theta = config.rope_theta

    def rotation(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rotary embedding of the grid of `tokens` (B, H, W, C), shared by the stage's blocks."""
        return rotary_embedding_2d(tokens.shape[1], tokens.shape[2], self.head_dim, self.rope_theta, tokens.device)


class SeNaTraEncoder(nn.Module):
    def __init__(self, config: SeNaTraConfig):
        super().__init__()
        # On the CPU whatever the default device: the rates are Python floats, and under `torch.device("meta")`
        # (accelerate's init_empty_weights, big-model loading) a meta tensor has no values to read.
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        bounds = [sum(config.depths[:i]) for i in range(config.num_stages + 1)]
        self.stages = nn.ModuleList(
            SeNaTraStage(config, i, rates[bounds[i] : bounds[i + 1]]) for i in range(config.num_stages)
        )

    def forward(self, hidden_states: torch.Tensor, stop_before_last: int = 0):
        """Run the stages on stem tokens (B, H, W, C).

        Returns the final tokens, every stage's output (channels-last) and the assignments. With
        `stop_before_last=n` the last n blocks of the final stage are left for the caller to run.
        """
        stage_outputs, assignments = [], []
        for i, stage in enumerate(self.stages):
            if stage.grouping is not None:
                hidden_states, assignment = stage.grouping(hidden_states)
                assignments.append(assignment)
            layers = stage.layers
            if i == len(self.stages) - 1 and stop_before_last:
                layers = layers[: len(layers) - stop_before_last]
            rotation = stage.rotation(hidden_states)
            for layer in layers:
                hidden_states = layer(hidden_states, rotation)
            stage_outputs.append(hidden_states)
        return hidden_states, stage_outputs, assignments


TASK_MODELS = ("SeNaTraForImageClassification", "SeNaTraForSemanticSegmentation", "SeNaTraForUniversalSegmentation")
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


class SeNaTraPreTrainedModel(PreTrainedModel):
    config_class = SeNaTraConfig
    config: SeNaTraConfig
    base_model_prefix = "senatra"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SeNaTraLayer", "SeNaTraGroupingLayer"]
    # Every class of this file, so that a saved folder loads as remote code through any of these Auto classes.
    _remote_auto_map = {
        "AutoConfig": "configuration_senatra.SeNaTraConfig",
        "AutoModel": "modeling_senatra.SeNaTraModel",
        "AutoBackbone": "modeling_senatra.SeNaTraBackbone",
        "AutoModelForImageClassification": "modeling_senatra.SeNaTraForImageClassification",
        "AutoModelForSemanticSegmentation": "modeling_senatra.SeNaTraForSemanticSegmentation",
        "AutoModelForUniversalSegmentation": "modeling_senatra.SeNaTraForUniversalSegmentation",
        "AutoModelForImageSegmentation": "modeling_senatra.SeNaTraForUniversalSegmentation",
    }

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, SeNaTraLayer) and module.attention_scale is not None:
            init.constant_(module.attention_scale, self.config.layer_scale_init_value)
            init.constant_(module.mlp_scale, self.config.layer_scale_init_value)
        elif isinstance(module, SeNaTraGroupingLayer) and module.kind != "none":
            init.copy_(module.relative_bias, module.parent_bias_init(self.config.grouping_parent_bias))
            if module.cosine:
                init.constant_(module.log_logit_scale, math.log(self.config.grouping_logit_scale))
            if self.config.grouping_zero_init_residual:
                # Applied after the layer's own Linear children were drawn (modules are initialised children
                # first), so every other weight is the same draw as without the option.
                init.zeros_(module.value.weight)
                init.zeros_(module.mlp.fc2.weight)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=1.0)  # EoMT's query initialisation
        elif isinstance(module, Mask2FormerLoss):
            empty_weight = torch.ones(self.config.num_labels + 1)
            empty_weight[-1] = self.config.no_object_weight
            init.copy_(module.empty_weight, empty_weight)
        elif isinstance(module, SeNaTraForUniversalSegmentation):
            init.ones_(module.attn_mask_probs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, change_head: bool = False, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but a task model refuses a checkpoint saved as another task
        model (its head would silently start from random) unless `change_head=True`. This is also what lets
        `pipeline("image-segmentation", model=folder)`, which tries several Auto classes and keeps the first
        that loads, pick the class the folder was saved as. Backbone checkpoints (`SeNaTraModel`) load into
        any task model."""
        if cls.__name__ in TASK_MODELS and not change_head:
            config = kwargs.get("config")
            if not isinstance(config, SeNaTraConfig):
                # Read only to check the architecture, and not passed on: `super().from_pretrained` loads the
                # config itself and applies config kwargs (`num_labels`, `id2label`, ...) to it; with an explicit
                # `config=` they would go to the model's __init__ instead and fail.
                hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
                config = SeNaTraConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
            saved_as = [name for name in config.architectures or [] if name in TASK_MODELS]
            if saved_as and cls.__name__ not in saved_as:
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds a {saved_as[0]}, not a {cls.__name__}; load it as "
                    f"{saved_as[0]}, or pass change_head=True to keep its backbone and start a new head"
                )
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info=True
        if isinstance(model, SeNaTraForUniversalSegmentation):
            model.keep_attn_mask_probs_reference()  # loading replaced the buffer object
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self._remote_auto_map}
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ---- the assignment hierarchy, available on every SeNaTra model ----

    def upsample_to_stage(self, values: torch.Tensor, assignments, source_stage: int, target_stage: int = 1):
        """Carry channels-first values (B, C, h, w) on stage `source_stage`'s grid down to stage `target_stage`
        (stages count from 1; stage 1 is stride `patch_size`) through the composed soft assignments."""
        if not 1 <= target_stage <= source_stage <= self.config.num_stages:
            raise ValueError(f"need 1 <= target_stage <= source_stage <= {self.config.num_stages}")
        transitions = slice(target_stage - 1, source_stage - 1)
        out = upsample_through(
            values.permute(0, 2, 3, 1), assignments[transitions], self.config.grouping_types[transitions]
        )
        return out.permute(0, 3, 1, 2)

    def native_segments(self, assignments) -> list[torch.Tensor]:
        """Hard segment maps of the native hierarchy, one per grouping level (coarser and coarser).

        Level l (l = 1 .. num_stages - 1) labels every stage-1 token (B, H/patch, W/patch) with the index
        (row-major) of the stage-(l+1) token it most belongs to under the composed assignment.
        """
        kinds = self.config.grouping_types
        return [hard_segments(assignments[:level], kinds[:level]) for level in range(1, len(assignments) + 1)]


class SeNaTraModel(SeNaTraPreTrainedModel):
    """The SeNaTra backbone: stage outputs, pooled output and the assignment hierarchy."""

    def __init__(self, config: SeNaTraConfig):
        super().__init__(config)
        self.embeddings = SeNaTraEmbeddings(config)
        self.encoder = SeNaTraEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps)
        self.post_init()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, **kwargs
    ) -> SeNaTraModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): height and width
            multiples of `config.input_size_divisor` (32 for the default 4 stages and patch size 4).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        check_pixel_values(pixel_values, self.config.num_channels, self.config.input_size_divisor)
        embeddings = self.embeddings(pixel_values)
        last, stage_outputs, assignments = self.encoder(embeddings)
        last = self.layernorm(last)
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(h.permute(0, 3, 1, 2) for h in [embeddings] + stage_outputs)
        return SeNaTraModelOutput(
            last_hidden_state=last.permute(0, 3, 1, 2),
            pooler_output=last.mean(dim=(1, 2)),
            hidden_states=hidden_states,
            assignments=tuple(assignments),
        )


class SeNaTraForImageClassification(SeNaTraPreTrainedModel):
    accepts_loss_kwargs = False

    def __init__(self, config: SeNaTraConfig):
        super().__init__(config)
        self.senatra = SeNaTraModel(config)
        self.classifier = nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, labels: torch.LongTensor | None = None, output_hidden_states=None, **kwargs
    ) -> ImageClassifierOutputWithNoAttention:
        outputs = self.senatra(pixel_values, output_hidden_states=output_hidden_states)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


def check_semantic_labels(labels: torch.Tensor, batch_size: int, num_labels: int, ignore_index: int) -> None:
    """Raise a ValueError naming the problem for semantic label maps the loss cannot take."""
    if labels.dim() != 3 or labels.shape[0] != batch_size:
        raise ValueError(f"labels must have shape (batch={batch_size}, height, width), got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if num_labels < 2:
        raise ValueError("the semantic loss needs num_labels >= 2")
    if not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_labels))
        if bad.any():
            raise ValueError(
                f"labels contain values outside [0, {num_labels}) that are not the ignore index {ignore_index}: "
                f"{labels[bad].unique()[:10].tolist()}"
            )


def semantic_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                           class_weights: list[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of (B, C, h, w) logits, bilinearly resized to the labels' size, averaged over the labelled
    pixels, each counted with its class's weight when `class_weights` are given. Written as a sum over the
    labelled pixels' total weight so that a batch with none gives 0, with its graph, instead of NaN."""
    if labels.shape[-2:] != logits.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    labels = labels.long()
    if class_weights is None:
        total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        return total / (labels != ignore_index).sum().clamp(min=1)
    weights = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    if weights.numel() != logits.shape[1]:
        raise ValueError(f"semantic_loss_weights has {weights.numel()} weights for {logits.shape[1]} classes")
    total = F.cross_entropy(logits.float(), labels, weight=weights, ignore_index=ignore_index, reduction="sum")
    return total / weights[labels[labels != ignore_index]].sum().clamp(min=1e-12)


class SeNaTraForSemanticSegmentation(SeNaTraPreTrainedModel):
    """SeNaTra with the native semantic head: a 2-layer MLP on final-stage tokens, whose logits are carried
    back to stride 4 through the composed grouping assignments (no decoder). Logits are returned at stride 4;
    with `labels`, they are bilinearly resized to the label size for the cross-entropy loss."""

    accepts_loss_kwargs = False

    def __init__(self, config: SeNaTraConfig):
        super().__init__(config)
        self.senatra = SeNaTraModel(config)
        self.head = nn.Sequential(
            nn.Linear(config.hidden_sizes[-1], config.head_hidden_size),
            ACT2FN[config.hidden_act],
            nn.Linear(config.head_hidden_size, config.num_labels),
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, labels: torch.LongTensor | None = None, output_hidden_states=None, **kwargs
    ) -> SemanticSegmenterOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*): class index per pixel,
            `config.semantic_loss_ignore_index` where unlabelled.
        """
        outputs = self.senatra(pixel_values, output_hidden_states=output_hidden_states)
        token_logits = self.head(outputs.last_hidden_state.permute(0, 2, 3, 1))
        logits = upsample_through(token_logits, outputs.assignments, self.config.grouping_types).permute(0, 3, 1, 2)
        loss = None
        if labels is not None:
            ignore = self.config.semantic_loss_ignore_index
            check_semantic_labels(labels, logits.shape[0], self.config.num_labels, ignore)
            loss = semantic_cross_entropy(logits, labels, ignore, self.config.semantic_loss_weights)
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)



@dataclass
class SeNaTraForUniversalSegmentationOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor`, *optional*): the Mask2Former loss summed over every prediction (deep
            supervision), with `mask_labels` and `class_labels`.
        class_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_labels + 1)`): class
            logits of each query; the last class is "no object".
        masks_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, height/4, width/4)`): mask
            logits of each query at stride 4 (native masks, carried through the grouping assignments).
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size, height/32, width/32)`):
            final-stage tokens after the final LayerNorm.
        assignments (`tuple(torch.FloatTensor)`): the grouping hierarchy, as in `SeNaTraModelOutput`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): as in `SeNaTraModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    class_queries_logits: torch.FloatTensor | None = None
    masks_queries_logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    assignments: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class SeNaTraMaskHead(nn.Module):
    """EoMT's mask-embedding head: a 3-layer MLP on the queries."""

    def __init__(self, config: SeNaTraConfig, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.fc3 = nn.Linear(dim, dim)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def check_mask_labels(mask_labels, class_labels, batch_size: int, num_labels: int) -> None:
    """Raise a ValueError naming the problem for panoptic/instance targets the loss cannot take."""
    if len(mask_labels) != batch_size or len(class_labels) != batch_size:
        raise ValueError(
            f"mask_labels and class_labels need one entry per image ({batch_size}), got {len(mask_labels)} and "
            f"{len(class_labels)}"
        )
    for i, (masks, classes) in enumerate(zip(mask_labels, class_labels)):
        if masks.dim() != 3 or classes.dim() != 1 or masks.shape[0] != classes.shape[0]:
            raise ValueError(
                f"image {i}: mask_labels must be (num_segments, height, width) and class_labels (num_segments,), "
                f"got {tuple(masks.shape)} and {tuple(classes.shape)}"
            )
        if classes.numel() and (classes.min() < 0 or classes.max() >= num_labels):
            raise ValueError(f"image {i}: class_labels must lie in [0, {num_labels}), got {classes.tolist()}")


def global_num_masks(class_labels, device) -> torch.Tensor:
    """The number of target masks per process that normalises the mask and dice losses: the sum over every
    process divided by their number (EoMT's rule), at least 1. With DDP averaging the gradients of W processes,
    the mask losses then equal those of one process on the whole global batch."""
    num_masks = torch.tensor(float(sum(len(classes) for classes in class_labels)), device=device)
    world_size = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num_masks)
        world_size = torch.distributed.get_world_size()
    return torch.clamp(num_masks / world_size, min=1)


class SeNaTraHungarianMatcher(Mask2FormerHungarianMatcher):
    """Mask2Former's Hungarian matcher (class, sigmoid-BCE and dice costs on `num_points` random points shared by
    the predictions and targets of an image), computed in float32 whatever the autocast (in bf16 the costs of
    close candidates round to ties and the matching turns arbitrary), with non-finite costs made finite and worse
    than every finite one: Transformers' matcher puts the dtype's maximum there, whose sums overflow in scipy
    and fail the matching as "infeasible"."""

    def sample_coordinates(self, device) -> torch.Tensor:
        """(1, num_points, 2) random points in [0, 1]^2 at which one image's masks are compared."""
        return torch.rand(1, self.num_points, 2, device=device)

    @torch.no_grad()
    def forward(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels):
        indices = []
        with torch.autocast(masks_queries_logits.device.type, enabled=False):
            for masks, logits, targets, classes in zip(masks_queries_logits, class_queries_logits, mask_labels,
                                                       class_labels):
                cost_class = -logits.float().softmax(-1)[:, classes]
                points = self.sample_coordinates(masks.device)
                pred = sample_point(masks.float()[:, None], points.repeat(masks.shape[0], 1, 1), align_corners=False)
                target = sample_point(targets.float()[:, None], points.repeat(targets.shape[0], 1, 1), align_corners=False)
                pred, target = pred.squeeze(1), target.squeeze(1)
                cost = (
                    self.cost_mask * pair_wise_sigmoid_cross_entropy_loss(pred, target)
                    + self.cost_class * cost_class
                    + self.cost_dice * pair_wise_dice_loss(pred, target)
                )
                finite = torch.isfinite(cost)
                if not finite.all():
                    worst = cost[finite].abs().max() if finite.any() else cost.new_zeros(())
                    cost = torch.where(finite, cost, 2 * worst + 1e4)
                rows, cols = linear_sum_assignment(cost.cpu().numpy())
                indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


class SeNaTraLoss(Mask2FormerLoss):
    """Transformers' `Mask2FormerLoss` (Hungarian matching, weighted class cross-entropy with a no-object class,
    point-sampled sigmoid-BCE and dice mask losses) with the float32 matcher above and the number of masks taken
    as `global_num_masks`: Transformers' `get_num_masks` averages over processes with Accelerate's `reduce` and
    then divides by the number of processes again, so on W processes its mask and dice losses come out W times
    too large against the class loss (transformers issue 26844)."""

    def __init__(self, config, weight_dict: dict[str, float]):
        super().__init__(config=config, weight_dict=weight_dict)
        self.matcher = SeNaTraHungarianMatcher(
            cost_class=config.class_weight, cost_mask=config.mask_weight, cost_dice=config.dice_weight,
            num_points=config.train_num_points,
        )

    def get_num_masks(self, class_labels, device) -> torch.Tensor:
        return global_num_masks(class_labels, device)


class SeNaTraForUniversalSegmentation(SeNaTraPreTrainedModel):
    """EoMT-style encoder-only mask transformer on the grouping backbone (semantic, instance and panoptic).

    `num_queries` learnable queries join the final stage for its last `num_blocks` blocks. In those blocks
    queries and tokens attend *globally* over [queries; tokens]: the final stage is tiny (1/1024 of the
    pixels), so global attention costs little there, lets every query see every token as in EoMT, and makes
    EoMT's masked attention a plain mask on one joint attention. A LayerNorm shared by every prediction
    (the backbone's final one) feeds a linear class head (C + 1 classes, the last is "no object") and a
    3-layer MLP mask-embedding head; mask logits are the dot product of mask embeddings with final-stage
    tokens, carried to stride 4 through the composed grouping assignments (native masks) instead of EoMT's
    transposed convolutions. Carrying the logits is the same linear map as carrying the features and dotting
    at stride 4, and is cheaper because K queries are fewer channels than the token width
    (`scripts/benchmark_universal.py` measures both).

    Training: before each query block a prediction is made from the current tokens (deep supervision) and
    turns into a query-to-token attention mask (logits > 0) that each query keeps with probability
    `attn_mask_probs[block]`; `MaskAnnealingCallback` anneals these from 1 to 0. Every prediction is matched
    and penalised by Transformers' `Mask2FormerLoss`. In eval mode a block whose probability is 0 makes no
    prediction and no mask (each block builds its own mask, so no mask of an earlier block is reused);
    with all probabilities 0 the forward is the backbone plus the heads, and exports with `torch.export`.
    """

    accepts_loss_kwargs = False
    builds_mask_per_block = True  # no stale-mask reuse: the annealing schedule needs no floor (training/)

    def __init__(self, config: SeNaTraConfig):
        super().__init__(config)
        self.num_blocks = min(config.num_blocks, config.depths[-1])
        if self.num_blocks < 1:
            raise ValueError("SeNaTraForUniversalSegmentation needs num_blocks >= 1 (blocks that see the queries)")
        width = config.hidden_sizes[-1]
        self.senatra = SeNaTraModel(config)
        self.query = nn.Embedding(config.num_queries, width)
        self.class_predictor = nn.Linear(width, config.num_labels + 1)
        self.mask_head = SeNaTraMaskHead(config, width)
        self.weight_dict = {
            "loss_cross_entropy": config.class_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
        }
        self.criterion = SeNaTraLoss(config=config, weight_dict=self.weight_dict)
        self.attn_mask_probs = nn.Buffer(torch.ones(self.num_blocks))
        self.post_init()
        self.keep_attn_mask_probs_reference()

    def keep_attn_mask_probs_reference(self) -> None:
        """Keep a plain reference to the `attn_mask_probs` buffer for the export check: while torch.export traces,
        the module's buffers are fake tensors without values, but this reference still reads the real one. Called
        wherever the buffer object can be replaced (construction, `.to()`/`_apply`, loading, each eager forward);
        in-place updates (annealing, `zero_()`) show through it."""
        self.__dict__["_attn_mask_probs_reference"] = self._buffers.get("attn_mask_probs")  # None while building

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self.keep_attn_mask_probs_reference()
        return module

    def check_exportable(self) -> None:
        """Refuse to export while masked attention is on: the exported graph is the unmasked inference model, which
        differs from this model's eager outputs until annealing has set every probability to 0."""
        probs = self.__dict__.get("_attn_mask_probs_reference")
        if probs is None or probs.is_meta or probs.shape != self.attn_mask_probs.shape:
            raise ValueError("attn_mask_probs cannot be read while exporting: run the model once in eager mode first")
        values = probs.tolist()
        if max(values) > 0:
            raise ValueError(
                f"torch.export of SeNaTraForUniversalSegmentation needs finished mask annealing (attn_mask_probs all "
                f"0), got {values}: the exported graph has no masked attention and would not compute what this "
                "model does; finish annealing (MaskAnnealingCallback, set_mask_annealing) or zero the buffer first"
            )

    def predict(self, tokens: torch.Tensor, queries: torch.Tensor):
        """Class logits (B, K, C+1) and final-stage mask logits (B, K, h, w) from tokens and queries."""
        norm = self.senatra.layernorm
        queries = norm(queries)
        mask_embeddings = self.mask_head(queries)
        mask_logits = torch.einsum("bkc,bhwc->bkhw", mask_embeddings, norm(tokens))
        return self.class_predictor(queries), mask_logits

    @staticmethod
    def query_attention_mask(mask_logits: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """(B, 1, K+N, K+N) bool mask: queries see only tokens of their own predicted mask (logit > 0), each
        query keeping that restriction with probability `prob`; everything else attends freely."""
        b, k = mask_logits.shape[:2]
        n = mask_logits.shape[2] * mask_logits.shape[3]
        keeps_mask = torch.rand(b, k, 1, device=mask_logits.device) < prob
        query_to_tokens = (mask_logits.flatten(2) > 0) | ~keeps_mask
        mask = torch.ones(b, 1, k + n, k + n, dtype=torch.bool, device=mask_logits.device)
        mask[:, 0, :k, k:] = query_to_tokens
        return mask

    def masks_to_stride4(self, mask_logits: torch.Tensor, assignments) -> torch.Tensor:
        return self.upsample_to_stage(mask_logits, assignments, source_stage=self.config.num_stages, target_stage=1)

    def block_is_masked(self, block: int) -> bool:
        """Whether query block `block` predicts and masks: always in training; in eval while its probability
        is above 0. Exporting traces the annealed inference model (probabilities 0), which has no
        data-dependent branch, and refuses a model whose annealing has not finished (`check_exportable`)."""
        if self.training:
            return True
        if torch.compiler.is_exporting():
            self.check_exportable()
            return False
        return bool(self.attn_mask_probs[block] > 0)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SeNaTraForUniversalSegmentationOutput:
        r"""
        mask_labels (`list[torch.Tensor]`, *optional*): per image, binary masks (num_segments, height, width).
        class_labels (`list[torch.LongTensor]`, *optional*): per image, the class of each mask (num_segments,).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        check_pixel_values(pixel_values, self.config.num_channels, self.config.input_size_divisor)
        if not torch.compiler.is_compiling():
            self.keep_attn_mask_probs_reference()
        backbone = self.senatra
        embeddings = backbone.embeddings(pixel_values)
        tokens, stage_outputs, assignments = backbone.encoder(embeddings, stop_before_last=self.num_blocks)
        batch, height, width, channels = tokens.shape
        num_queries = self.query.weight.shape[0]
        # The query blocks run on the joint sequence [queries; tokens] (LayerNorms, projections and MLPs once over
        # both); predictions read the two parts back as views.
        sequence = torch.cat([self.query.weight[None].expand(batch, -1, -1), tokens.flatten(1, 2)], dim=1)

        def split(sequence):
            return sequence[:, :num_queries], sequence[:, num_queries:].reshape(batch, height, width, channels)

        predictions = []
        last_stage = backbone.encoder.stages[-1]
        rotation = rotary_embedding_sequence(
            height, width, last_stage.head_dim, last_stage.rope_theta, num_queries, tokens.device
        )
        for block, layer in enumerate(last_stage.layers[-self.num_blocks :]):
            attention_mask = None
            if self.block_is_masked(block):
                queries, tokens = split(sequence)
                class_logits, mask_logits = self.predict(tokens, queries)
                predictions.append((class_logits, mask_logits))
                attention_mask = self.query_attention_mask(mask_logits, self.attn_mask_probs[block])
            sequence = layer(sequence, rotation, attention_mask)
        queries, tokens = split(sequence)
        stage_outputs[-1] = tokens
        class_logits, mask_logits = self.predict(tokens, queries)
        predictions.append((class_logits, mask_logits))
        masks_queries_logits = self.masks_to_stride4(mask_logits, assignments)

        loss = None
        if mask_labels is not None and class_labels is not None:
            check_mask_labels(mask_labels, class_labels, tokens.shape[0], self.config.num_labels)
            loss = sum(
                self.prediction_loss(self.masks_to_stride4(masks, assignments), classes, mask_labels, class_labels)
                for classes, masks in predictions[:-1]
            )
            loss = loss + self.prediction_loss(masks_queries_logits, class_logits, mask_labels, class_labels)

        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(h.permute(0, 3, 1, 2) for h in [embeddings] + stage_outputs)
        return SeNaTraForUniversalSegmentationOutput(
            loss=loss,
            class_queries_logits=class_logits,
            masks_queries_logits=masks_queries_logits,
            last_hidden_state=backbone.layernorm(tokens).permute(0, 3, 1, 2),
            assignments=tuple(assignments),
            hidden_states=hidden_states,
        )

    def prediction_loss(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels) -> torch.Tensor:
        """Mask2Former's matched loss of one prediction, weighted class 2 / mask 5 / dice 5 (by default)."""
        losses = self.criterion(
            masks_queries_logits=masks_queries_logits,
            class_queries_logits=class_queries_logits,
            mask_labels=[m.to(masks_queries_logits.dtype) for m in mask_labels],
            class_labels=[c.long() for c in class_labels],
        )
        return sum(self.weight_dict[name] * value for name, value in losses.items())


class SeNaTraBackbone(BackboneMixin, SeNaTraPreTrainedModel):
    """SeNaTra as a Transformers backbone: LayerNorm-ed feature maps of `config.out_features` (strides 4, 4,
    8, 16, 32 for stem, stage1 ... stage4), for heads such as UperNet and Mask2Former."""

    has_attentions = False

    def __init__(self, config: SeNaTraConfig):
        super().__init__(config)
        self.embeddings = SeNaTraEmbeddings(config)
        self.encoder = SeNaTraEncoder(config)
        self.num_features = [config.hidden_sizes[0]] + list(config.hidden_sizes)
        self.hidden_states_norms = nn.ModuleDict(
            {stage: nn.LayerNorm(channels, eps=config.layer_norm_eps) for stage, channels in zip(self.out_features, self.channels)}
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, **kwargs
    ) -> SeNaTraBackboneOutput:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        check_pixel_values(pixel_values, self.config.num_channels, self.config.input_size_divisor)
        embeddings = self.embeddings(pixel_values)
        _, stage_outputs, assignments = self.encoder(embeddings)
        hidden_states = [embeddings] + stage_outputs
        feature_maps = tuple(
            self.hidden_states_norms[stage](hidden).permute(0, 3, 1, 2)
            for stage, hidden in zip(self.stage_names, hidden_states)
            if stage in self.out_features
        )
        all_hidden = tuple(h.permute(0, 3, 1, 2) for h in hidden_states) if output_hidden_states else None
        return SeNaTraBackboneOutput(feature_maps=feature_maps, hidden_states=all_hidden, assignments=tuple(assignments))


# pipeline("image-segmentation") checks a model's class name against transformers' own name tables (merged by model
# type), not against the classes registered with the Auto classes, and otherwise logs "not supported for
# image-segmentation" for every pipeline it builds. Registered here, in the module that remote code loads too, so
# that holds with `trust_remote_code=True` as after `import native_seg_hf`. The tables also back the lazy Auto
# mappings, which only read entries of model types in transformers' config table (ours are not): these entries
# serve the pipeline's check alone.
MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES[SeNaTraConfig.model_type] = (
    SeNaTraForSemanticSegmentation.__name__,
    SeNaTraForUniversalSegmentation.__name__,
)

__all__ = [
    "SeNaTraPreTrainedModel",
    "SeNaTraModel",
    "SeNaTraModelOutput",
    "SeNaTraBackbone",
    "SeNaTraBackboneOutput",
    "SeNaTraForImageClassification",
    "SeNaTraForSemanticSegmentation",
    "SeNaTraForUniversalSegmentation",
    "SeNaTraForUniversalSegmentationOutput",
]
