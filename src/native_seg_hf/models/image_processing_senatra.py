"""Image processor for SeNaTra, Segmenter and EoMT-style query models: pre-processing and every post-processing.

Geometry. An image of size (H, W) is resized (keeping its aspect ratio, or to a fixed size) to its *content size*,
normalised, and zero-padded at the bottom and right: to a multiple of `size_divisor` (SeNaTra needs multiples of its
last stage's stride, 32) and to the largest such size in the batch, or to a fixed `pad_size` (EoMT's fixed input).
Post-processing recomputes that geometry from `target_sizes` (the original sizes of the whole batch) and this
processor's settings, then samples the model's outputs, whatever their resolution (stride-4 logits, full-resolution
sliding-window logits), straight onto the original pixel grid in one resampling: padding and resizing are undone
together. Memory stays bounded at any photo size: decisions (scores, which segments are kept) are measured on the grid
the model saw, maps are made in row bands (`CHUNK_ELEMENTS`) that resample only the classes or queries that can win
them, and each kept instance's mask only over the window it can cover.

Two kinds of outputs are understood:
- semantic logits: `logits` (B, C, h, w), as `SeNaTraForSemanticSegmentation` and `SegmenterForSemanticSegmentation`
  return them;
- query predictions: `class_queries_logits` (B, K, C + 1, the last class is "no object") and `masks_queries_logits`
  (B, K, h, w), as `SeNaTraForUniversalSegmentation` and Transformers' `EomtForUniversalSegmentation` return them.

`pipeline("image-segmentation", model=folder)` needs this processor saved next to the model:

    model.save_pretrained(folder)
    SeNaTraImageProcessor.from_model_config(model.config).save_pretrained(folder)

This file imports only installed packages, so Transformers can copy it next to the weights as remote code.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import convert_to_rgb, get_size_with_aspect_ratio
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
)
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.processing_utils import ImagesKwargs, Unpack

IMAGE_CHANNELS = (1, 3, 4)  # grayscale, RGB, RGBA


class SeNaTraImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    size_divisor (`int`, *optional*, defaults to `self.size_divisor`):
        With `do_pad`, height and width are padded up to a multiple of this (the model's input stride).
    ignore_index (`int`, *optional*, defaults to `self.ignore_index`):
        Label of unlabelled pixels in semantic `labels`, also used to fill their padding.
    do_reduce_labels (`bool`, *optional*, defaults to `self.do_reduce_labels`):
        Whether class 0 of the segmentation maps means "unlabelled" (ADE20K): 0 becomes `ignore_index` and every
        other class id is lowered by 1.
    num_labels (`int`, *optional*, defaults to `self.num_labels`):
        Number of classes; when set, class ids outside `[0, num_labels)` (other than `ignore_index`) raise.
    stuff_classes (`list[int]`, *optional*, defaults to `self.stuff_classes`):
        Classes that panoptic post-processing merges into one segment each.
    return_mask_labels (`bool`, *optional*, defaults to `self.return_mask_labels`):
        Whether semantic maps come back as `mask_labels` + `class_labels` (one binary mask per class present, what
        query models train on) instead of `labels`. Maps given with `instance_id_to_semantic_id` always do.
    """

    size_divisor: int
    ignore_index: int
    do_reduce_labels: bool
    num_labels: int | None
    stuff_classes: list[int] | None
    return_mask_labels: bool


# ---- geometry: shared by pre- and post-processing so that one undoes exactly what the other did ----


def content_size(original: tuple[int, int], do_resize: bool, size: SizeDict) -> tuple[int, int]:
    """(height, width) of an image of size `original` after resizing with `size`."""
    if not do_resize:
        return original
    if size.height and size.width:
        return size.height, size.width
    if size.shortest_edge:  # `longest_edge`, when also given, caps the longer side (DETR-family semantics)
        height, width = get_size_with_aspect_ratio(original, size.shortest_edge, size.longest_edge)
    elif size.longest_edge:
        scale = size.longest_edge / max(original)
        height, width = round(original[0] * scale), round(original[1] * scale)
    else:
        raise ValueError(
            f"size must have height and width, shortest_edge (optionally with longest_edge) or longest_edge; got {size}"
        )
    # An extreme aspect ratio must not round a side down to nothing.
    return max(height, 1), max(width, 1)


def padded_size(
    contents: list[tuple[int, int]], do_pad: bool, pad_size: SizeDict | None, size_divisor: int
) -> tuple[int, int]:
    """(height, width) of the batch tensor holding images of the given content sizes."""
    height, width = max(h for h, _ in contents), max(w for _, w in contents)
    if not do_pad:
        if any(c != (height, width) for c in contents):
            raise ValueError(f"with do_pad=False every image must have the same size after resizing, got {contents}")
        return height, width
    if pad_size is not None:
        if height > pad_size.height or width > pad_size.width:
            raise ValueError(f"an image of {height}x{width} pixels after resizing does not fit pad_size {dict(pad_size)}")
        return pad_size.height, pad_size.width
    return -(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor


@dataclass(frozen=True)
class ImageGeometry:
    """Where one image of a batch went during pre-processing: (height, width) pairs."""

    original: tuple[int, int]
    content: tuple[int, int]  # after resizing; the top-left corner of the padded input
    padded: tuple[int, int]  # the batch tensor

    def to_original(
        self,
        maps: torch.Tensor,
        mode: str = "bilinear",
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Sample maps (N, C, h, w) that cover the padded input at any resolution onto the original pixel grid,
        giving (N, C, H, W) in float32: the padding is cropped and the resizing undone in a single resampling.
        `rows` and `cols`, (start, stop) ranges of original pixels, sample only that window of the grid (the same
        values as the whole grid has there), so large images can be processed in bands."""
        (height, width), (content_h, content_w), (padded_h, padded_w) = self.original, self.content, self.padded
        maps = maps.float()  # half-precision coordinates would be off by a pixel on large images
        # The centre of original row i lies at (i + 0.5) * content_h / height in padded-input pixels; maps span the
        # padded input, so in grid_sample's [-1, 1] coordinates (align_corners=False) that is twice that over
        # padded_h, minus 1. The same sampling F.interpolate(align_corners=False) does, with the crop folded in.
        options = dict(device=maps.device, dtype=maps.dtype)
        rows = (torch.arange(*(rows or (0, height)), **options) + 0.5) * (2 * content_h / (height * padded_h)) - 1
        cols = (torch.arange(*(cols or (0, width)), **options) + 0.5) * (2 * content_w / (width * padded_w)) - 1
        grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)  # (rows, cols, (x, y))
        grid = grid.expand(maps.shape[0], *grid.shape)
        return F.grid_sample(maps, grid, mode=mode, padding_mode="border", align_corners=False)

    def as_model_input(self) -> "ImageGeometry":
        """The same image on the grid of its resized content, the pixels the model saw (its original grid when that
        is smaller). What post-processing decides (scores, areas, which segments are kept) is measured on this grid:
        identical to measuring it at the original size for photos no larger than the model's input, and at a cost
        that does not grow with the photo's size for larger ones."""
        size = tuple(min(original, content) for original, content in zip(self.original, self.content))
        return ImageGeometry(size, self.content, self.padded)

    def sample_positions(self, map_size: int, axis: int) -> torch.Tensor:
        """Where bilinear sampling of `to_original` reads maps with `map_size` cells along `axis` (0 rows, 1 columns)
        for every original pixel: float64 positions in cells, clamped to the border as `to_original` is; the pixel
        reads cells floor(p) and floor(p) + 1 (at most the last cell)."""
        original, content, padded = self.original[axis], self.content[axis], self.padded[axis]
        positions = (torch.arange(original, dtype=torch.float64) + 0.5) * (content * map_size / (original * padded))
        return (positions - 0.5).clamp(0, map_size - 1)

    def pixels_reading(self, cells: tuple[int, int], map_size: int, axis: int) -> tuple[int, int]:
        """The (start, stop) range of original pixels along `axis` whose bilinear samples read any of the cells
        `cells[0]` to `cells[1]` (inclusive) of maps with `map_size` cells along it, widened by a pixel for rounding."""
        positions = self.sample_positions(map_size, axis)
        start = int(torch.searchsorted(positions, float(cells[0] - 1), right=True)) - 1
        stop = int(torch.searchsorted(positions, float(cells[1] + 1))) + 1
        return max(start, 0), min(stop, self.original[axis])


# Post-processing works on chunks of at most this many float32 values at the original size (64 MB): row bands of all
# classes or queries, so that memory stays flat however large the photo and however many the classes or queries.
CHUNK_ELEMENTS = 2**24


def row_bands(height: int, values_per_row: int):
    """(start, stop) ranges covering `height` rows, each holding at most `CHUNK_ELEMENTS` values (one row at least)."""
    step = max(1, CHUNK_ELEMENTS // max(1, values_per_row))
    return [(start, min(start + step, height)) for start in range(0, height, step)]


def nearest_resize(label_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map, sampling at pixel centres like PIL's NEAREST.

    Indexing rather than transformers' PIL-based `resize`: it keeps any integer id exactly (panoptic ids go far beyond
    what an 8-bit or float32 PIL image holds) and never mixes labels."""
    height, width = label_map.shape
    rows = ((np.arange(size[0]) + 0.5) * height / size[0]).astype(np.int64)
    cols = ((np.arange(size[1]) + 0.5) * width / size[1]).astype(np.int64)
    return label_map[rows[:, None], cols[None, :]]


def _class_map(image: ImageGeometry, logits: torch.Tensor) -> torch.Tensor:
    """argmax over classes of logits (C, h, w) resampled to the original size, as an (H, W) int64 map, in row bands."""
    class_map = torch.empty(image.original, dtype=torch.long, device=logits.device)
    for (start, stop), _, owner, _ in _pixel_owners(image, logits, prune=True):
        class_map[start:stop] = owner
    return class_map


def _mask_window(image: ImageGeometry, logits: torch.Tensor, mask_threshold: float):
    """One query's mask, sigmoid(logits (h, w) resampled) > `mask_threshold`, at the original size but only over the
    window it can cover: `((row_start, row_stop), (col_start, col_stop), (rows, cols) bool)`, None when it is empty.

    A bilinear sample lies between the cells it reads, so a pixel is on only if a cell next to it is; the window
    spans the pixels that read the cells which are on, and costs the mask's extent rather than the whole image."""
    cells = (logits.sigmoid() > mask_threshold).nonzero()
    if not len(cells):
        return None
    (top, left), (bottom, right) = cells.min(0).values.tolist(), cells.max(0).values.tolist()
    rows = image.pixels_reading((top, bottom), logits.shape[0], axis=0)
    cols = image.pixels_reading((left, right), logits.shape[1], axis=1)
    window = image.to_original(logits[None, None], rows=rows, cols=cols)[0, 0].sigmoid() > mask_threshold
    return (rows, cols, window) if window.any() else None


def _mask_statistics(image: ImageGeometry, logits: torch.Tensor, mask_threshold: float):
    """Per query of mask logits (n, h, w) sampled onto `image`'s grid a few queries at a time: the area of its mask,
    sigmoid > `mask_threshold`, and the mean probability inside it (0 for an empty mask)."""
    areas, mean_probs = [], []
    step = max(1, CHUNK_ELEMENTS // (image.original[0] * image.original[1]))
    for start in range(0, len(logits), step):
        probs = image.to_original(logits[None, start : start + step])[0].sigmoid()
        masks = probs > mask_threshold
        areas.append(masks.sum((1, 2)))
        mean_probs.append((probs * masks).sum((1, 2)) / areas[-1].clamp(min=1))
    return torch.cat(areas), torch.cat(mean_probs)


def _pixel_owners(image: ImageGeometry, logits, scores=None, prune: bool = False):
    """Which of n maps of logits (n, h, w) owns each pixel of `image`'s grid: the one whose resampled logit is the
    highest (classes of a semantic map) or, given `scores` (n,), whose score x sigmoid(logit) is (panoptic queries);
    ties go to the first. Yields per row band `((start, stop), resampled, owner, owner_logit)`: the resampled logits of
    the band's candidate maps (c, rows, W), and for each pixel (rows, W) its owner and the owner's logit there.

    With `prune`, a band resamples only the maps that can own one of its pixels (then c < n). A bilinear sample lies
    between the 2x2 cells it reads, and both rankings grow with the logit, so over such a square a map's value is at
    most its largest there and at least its smallest: a map whose largest is below another's smallest owns none of the
    square's pixels."""

    def values(resampled, which):
        return resampled if scores is None else scores[which, None, None] * resampled.sigmoid()

    n, h, w = logits.shape
    contenders = torch.ones((n, h), dtype=torch.bool, device=logits.device)  # (n, rows of squares)
    if prune:
        cells = F.pad(values(logits.float(), slice(None))[None], (0, 1, 0, 1), mode="replicate")
        highest = F.max_pool2d(cells, 2, stride=1)[0]  # (n, h, w), squares by their top-left cell
        lowest = -F.max_pool2d(-cells, 2, stride=1)[0].max(0).values
        contenders = (highest >= lowest - 1e-5 * lowest.abs()).any(2)  # the margin covers rounding
    square_rows = image.sample_positions(h, axis=0).floor().long()  # the row of squares each pixel row reads
    for start, stop in row_bands(image.original[0], n * image.original[1]):
        first, last = max(int(square_rows[start]) - 1, 0), min(int(square_rows[stop - 1]) + 1, h - 1)
        candidates = contenders[:, first : last + 1].any(1).nonzero()[:, 0]  # ascending, so ties stay with the first
        resampled = image.to_original(logits[None, candidates], rows=(start, stop))[0]
        best = values(resampled, candidates).argmax(0)
        yield (start, stop), resampled, candidates[best], resampled.gather(0, best[None])[0]


def _panoptic_map(image: ImageGeometry, logits, scores, segment_of_query, segments, mask_threshold):
    """The (H, W) map of segment ids at the original size: each pixel goes to its owner (`_pixel_owners`) when the
    owner's mask is on there, and then to that query's segment (`segment_of_query`, -1 for none). Segments that end
    up with no pixel are dropped. Returns the map and the remaining segments' infos, renumbered."""
    segmentation = torch.empty(image.original, dtype=torch.long, device=logits.device)
    for (start, stop), _, owner, owner_logit in _pixel_owners(image, logits, scores, prune=True):
        segmentation[start:stop] = segment_of_query[torch.where(owner_logit.sigmoid() >= mask_threshold, owner, len(scores))]
    areas = torch.bincount(segmentation.flatten() + 1, minlength=len(segments) + 1)[1:]
    if bool((areas == 0).any()):
        present = (areas > 0).nonzero()[:, 0]
        renumber = torch.full((len(segments) + 1,), -1, dtype=torch.long, device=logits.device)
        renumber[present + 1] = torch.arange(len(present), device=logits.device)
        segmentation = renumber[segmentation + 1]
        segments = [{**segments[old], "id": new} for new, old in enumerate(present.tolist())]
    return segmentation, segments


# ---- input checks and conversion ----


def _as_list(inputs, name: str, item_ndims: int) -> list:
    """One input or a batch of them (a list, or an array/tensor with one more dimension than an item) as a list."""
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError(f"{name} is an empty batch")
        return list(inputs)
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == item_ndims + 1:
        return list(inputs)
    return [inputs]


def _as_array(item, name: str) -> np.ndarray:
    if isinstance(item, torch.Tensor):
        return item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        return item
    raise ValueError(f"{name} must be a PIL image, a numpy array or a torch tensor, got {type(item).__name__}")


def _channel_axis(shape: tuple[int, ...], prefer_last: bool, input_data_format) -> int:
    """Which axis of a 3-D image holds the channels: the given format, else the preferred end if it has 1, 3 or 4
    entries, else the other end if that does, else the shorter end (so a bad channel count is reported as such)."""
    if input_data_format is not None:
        return -1 if ChannelDimension(input_data_format) == ChannelDimension.LAST else 0
    preferred, other = (-1, 0) if prefer_last else (0, -1)
    for axis in (preferred, other):
        if shape[axis] in IMAGE_CHANNELS:
            return axis
    return -1 if shape[-1] < shape[0] else 0


def to_rgb_array(image, name: str, input_data_format=None) -> np.ndarray:
    """One image (PIL, numpy or torch; grayscale, RGB or RGBA) as a channels-first RGB array (3, H, W).

    numpy arrays are read channels-last when their last axis could hold channels, tensors channels-first;
    `input_data_format` settles ambiguous shapes. Transparency is composited onto white."""
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise ValueError(f"{name} has 0 pixels (size {image.height}x{image.width})")
        return np.moveaxis(convert_to_rgb(image, return_numpy=True), -1, 0)
    array = _as_array(image, name)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        array = np.moveaxis(array, _channel_axis(array.shape, isinstance(image, np.ndarray), input_data_format), 0)
    else:
        raise ValueError(f"{name} must have shape (H, W), (H, W, C) or (C, H, W), got {array.shape}")
    channels, height, width = array.shape
    if height == 0 or width == 0:
        raise ValueError(f"{name} has 0 pixels (size {height}x{width})")
    if channels not in IMAGE_CHANNELS:
        raise ValueError(f"{name} has {channels} channels; expected 1 (grayscale), 3 (RGB) or 4 (RGBA)")
    if channels == 1:
        return np.repeat(array, 3, axis=0)
    if channels == 4:
        rgb = convert_to_rgb(np.moveaxis(array, 0, -1), return_numpy=True, input_data_format=ChannelDimension.LAST)
        return np.moveaxis(rgb, -1, 0)
    return array


def to_label_array(segmentation_map, name: str) -> np.ndarray:
    """One segmentation map (PIL, numpy or torch) of integer ids as an int64 array (H, W)."""
    if isinstance(segmentation_map, Image.Image):
        if segmentation_map.mode in ("RGB", "RGBA"):
            raise ValueError(
                f"{name} is an {segmentation_map.mode} image, but a segmentation map holds one id per pixel "
                "(decode COCO panoptic PNGs first: id = R + 256 * G + 256**2 * B)"
            )
        array = np.array(segmentation_map)
    else:
        array = _as_array(segmentation_map, name)
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W), got {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"{name} must hold integer ids, got dtype {array.dtype}")
    return array.astype(np.int64)


def _reduce_labels(class_ids: np.ndarray, ignore_index: int) -> np.ndarray:
    """ADE20K convention: class 0 is "unlabelled" and becomes `ignore_index`; the other ids move down by 1."""
    return np.where(class_ids == 0, ignore_index, class_ids - 1)


def _check_class_ids(class_ids: np.ndarray, name: str, num_labels: int | None, ignore_index: int) -> None:
    valid = class_ids == ignore_index
    valid |= (class_ids >= 0) & ((class_ids < num_labels) if num_labels is not None else True)
    if not valid.all():
        bound = f"[0, {num_labels})" if num_labels is not None else "the non-negative ids"
        raise ValueError(
            f"{name} holds class ids {np.unique(class_ids[~valid])[:10].tolist()} outside {bound} that are not the "
            f"ignore index {ignore_index}"
        )


# ---- reading model outputs ----


def _output_field(outputs, name: str):
    """A field of a model output, a dict (what the pipeline passes) or any object with attributes."""
    return outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)


def _query_predictions(outputs) -> tuple[torch.Tensor, torch.Tensor] | None:
    class_logits = _output_field(outputs, "class_queries_logits")
    mask_logits = _output_field(outputs, "masks_queries_logits")
    return None if class_logits is None or mask_logits is None else (class_logits, mask_logits)


def _require_query_predictions(outputs, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    predictions = _query_predictions(outputs)
    if predictions is None:
        present = [key for key in ("logits", "class_queries_logits", "masks_queries_logits") if _output_field(outputs, key) is not None]
        raise ValueError(
            f"{task} segmentation needs query predictions (class_queries_logits and masks_queries_logits, as from "
            f"SeNaTraForUniversalSegmentation or EomtForUniversalSegmentation); these outputs hold only {present}"
        )
    return predictions


def semantic_logits(outputs) -> torch.Tensor:
    """Per-pixel class scores (B, C, h, w) of any of our outputs: semantic `logits` as they are, or, for query
    predictions, sum_q softmax(class_q)[c] * sigmoid(mask_q) (the no-object class left out), as in EoMT."""
    logits = _output_field(outputs, "logits")
    if logits is not None:
        return logits
    class_logits, mask_logits = _require_query_predictions(outputs, "semantic")
    return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window origins along one side: every `stride`, the last one flush with the end (Segmenter's rule)."""
    if length <= window:
        return [0]
    return list(range(0, length - window, stride)) + [length - window]


class SeNaTraImageProcessor(PilBackend):
    r"""
    Image processor of SeNaTra and Segmenter models, also usable with EoMT-style query models
    (`SeNaTraForUniversalSegmentation`, Transformers' `EomtForUniversalSegmentation`).

    Pre-processing takes PIL images, numpy arrays or torch tensors (grayscale, RGB or RGBA, converted to RGB), one or a
    batch, of any size; resizes them (`size`: `{"shortest_edge": s}` optionally capped by `"longest_edge"`,
    `{"longest_edge": l}`, or `{"height": h, "width": w}`), rescales and normalises them, and pads them at the bottom
    and right to a multiple of `size_divisor` (or to `pad_size`). It returns `pixel_values` and `pixel_mask` (1 on the
    image, 0 on padding), and, given `segmentation_maps` (resized with nearest sampling), either `labels` (semantic
    maps; padding and unlabelled pixels are `ignore_index`) or `mask_labels` + `class_labels` (maps of instance ids
    with `instance_id_to_semantic_id`, or semantic maps with `return_mask_labels=True`).

    Post-processing undoes the padding and resizing (see `ImageGeometry`): `post_process_semantic_segmentation`,
    `post_process_instance_segmentation`, `post_process_panoptic_segmentation` and
    `post_process_hierarchical_segmentation` (SeNaTra's native groups). They assume the inputs were prepared with this
    processor's own settings. `sliding_window_inference` runs a model over windows of an image larger than its training
    size and merges their logits.

    Use `SeNaTraImageProcessor.from_model_config(config)` to match a model's stride, labels and stuff classes.
    """

    valid_kwargs = SeNaTraImageProcessorKwargs
    model_input_names = ["pixel_values", "pixel_mask"]
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    # mmseg's test-time resize for ADE20K-style data: short side 512, long side at most 2048.
    size = {"shortest_edge": 512, "longest_edge": 2048}
    default_to_square = False
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_pad = True
    pad_size = None
    size_divisor = 32
    ignore_index = 255
    do_reduce_labels = False
    num_labels = None
    stuff_classes = None
    return_mask_labels = False

    def __init__(self, **kwargs: Unpack[SeNaTraImageProcessorKwargs]):
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "SeNaTraImageProcessor":
        """A processor matched to a model config: `size_divisor` from its `input_size_divisor` (or its backbone's),
        `ignore_index` from `semantic_loss_ignore_index`, `num_labels`, and `stuff_classes` when the config has them.
        `kwargs` override any setting."""
        backbone_config = getattr(config, "backbone_config", None)
        settings = {
            "size_divisor": getattr(config, "input_size_divisor", None) or getattr(backbone_config, "input_size_divisor", None),
            "ignore_index": getattr(config, "semantic_loss_ignore_index", None),
            "num_labels": config.num_labels,
            "stuff_classes": getattr(config, "stuff_classes", None),
        }
        found = {key: value for key, value in settings.items() if value is not None}
        return cls(**{**found, **kwargs})

    def to_dict(self) -> dict:
        processor_dict = super().to_dict()
        remote_class = processor_dict.get("auto_map", {}).get("AutoImageProcessor")
        if isinstance(remote_class, str):
            # Saved as a (pil, torchvision) pair with no torchvision class, which is what this processor is. A plain
            # string would also make transformers 5.23's pipeline guess a remote video processor from it (the same
            # reference with "ImageProcessor" renamed) and ask the user to trust code that does not exist.
            processor_dict["auto_map"] = {**processor_dict["auto_map"], "AutoImageProcessor": [remote_class, None]}
        return processor_dict

    def preprocess(self, images, segmentation_maps=None, instance_id_to_semantic_id=None, **kwargs) -> BatchFeature:
        r"""
        images: one image or a batch (list, or a 4-D array/tensor).
        segmentation_maps (*optional*): one integer map (H, W) per image, the same size as its image: class ids, or
            instance ids when `instance_id_to_semantic_id` is given.
        instance_id_to_semantic_id (`dict[int, int]` or a list of them, one per image, *optional*): the class of every
            instance id in the maps; ids whose class is `ignore_index` (after `do_reduce_labels`) are left unlabelled.
        """
        return super().preprocess(images, segmentation_maps, instance_id_to_semantic_id, **kwargs)

    def _preprocess_image_like_inputs(
        self,
        images,
        segmentation_maps,
        instance_id_to_semantic_id,
        *,
        input_data_format=None,
        return_tensors=None,
        do_resize: bool,
        size: SizeDict,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        do_pad: bool,
        pad_size: SizeDict | None,
        size_divisor: int,
        ignore_index: int,
        do_reduce_labels: bool,
        num_labels: int | None,
        return_mask_labels: bool,
        **kwargs,
    ) -> BatchFeature:
        arrays = [
            to_rgb_array(image, f"images[{i}]", input_data_format)
            for i, image in enumerate(_as_list(images, "images", item_ndims=3))
        ]
        originals = [image.shape[1:] for image in arrays]
        contents = [content_size(original, do_resize, size) for original in originals]
        target = SizeDict(*padded_size(contents, do_pad, pad_size, size_divisor))

        pixels = []
        for image, content in zip(arrays, contents):
            if image.shape[1:] != content:
                image = self.resize(image, SizeDict(*content), resample)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            pixels.append(image)
        pixel_values, pixel_mask = self.pad(pixels, pad_size=target, return_mask=True)
        data = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

        if segmentation_maps is not None:
            maps = _as_list(segmentation_maps, "segmentation_maps", item_ndims=2)
            if len(maps) != len(arrays):
                raise ValueError(f"got {len(maps)} segmentation_maps for {len(arrays)} images")
            if isinstance(instance_id_to_semantic_id, (list, tuple)) and len(instance_id_to_semantic_id) != len(maps):
                raise ValueError(
                    f"instance_id_to_semantic_id has {len(instance_id_to_semantic_id)} entries for {len(maps)} maps"
                )
            label_maps = []
            for i, (segmentation_map, original) in enumerate(zip(maps, originals)):
                name = f"segmentation_maps[{i}]"
                label_map = to_label_array(segmentation_map, name)
                if label_map.shape != original:
                    raise ValueError(
                        f"{name} is {label_map.shape[0]}x{label_map.shape[1]} but images[{i}] is "
                        f"{original[0]}x{original[1]} (height x width): a map must have its image's size"
                    )
                label_maps.append(label_map)
            options = dict(ignore_index=ignore_index, do_reduce_labels=do_reduce_labels, num_labels=num_labels)
            if instance_id_to_semantic_id is None and not return_mask_labels:
                data["labels"] = self._semantic_labels(label_maps, contents, target, **options)
            else:
                data["mask_labels"], data["class_labels"] = self._mask_labels(
                    label_maps, instance_id_to_semantic_id, contents, target, **options
                )
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["mask_labels", "class_labels"])

    def _semantic_labels(self, label_maps, contents, target, ignore_index, do_reduce_labels, num_labels):
        labels = []
        for i, (label_map, content) in enumerate(zip(label_maps, contents)):
            if do_reduce_labels:
                label_map = _reduce_labels(label_map, ignore_index)
            _check_class_ids(label_map, f"segmentation_maps[{i}]", num_labels, ignore_index)
            labels.append(nearest_resize(label_map, content)[None])
        return [label[0] for label in self.pad(labels, pad_size=target, fill_value=ignore_index)]

    def _mask_labels(self, label_maps, id_to_class, contents, target, ignore_index, do_reduce_labels, num_labels):
        """Binary masks (N, H, W) float32 and classes (N,) int64 per image, one per labelled instance (or, for
        semantic maps, per class) present after resizing; padding belongs to no mask."""
        mask_labels, class_labels = [], []
        for i, (label_map, content) in enumerate(zip(label_maps, contents)):
            name = f"segmentation_maps[{i}]"
            ids = np.unique(label_map)
            if id_to_class is None:  # a semantic map: every class id is its own "instance"
                classes = ids
            else:
                mapping = id_to_class[i] if isinstance(id_to_class, (list, tuple)) else id_to_class
                missing = [int(v) for v in ids if int(v) not in mapping]
                if missing:
                    raise ValueError(f"{name} holds instance ids {missing[:10]} that instance_id_to_semantic_id lacks")
                classes = np.array([mapping[int(v)] for v in ids], dtype=np.int64)
            if do_reduce_labels:
                classes = _reduce_labels(classes, ignore_index)
            _check_class_ids(classes, name, num_labels, ignore_index)
            resized = nearest_resize(label_map, content)
            kept = (classes != ignore_index) & np.isin(ids, resized)  # labelled, and not lost in downscaling
            masks = (resized[None] == ids[kept, None, None]).astype(np.float32)  # (N, h, w), N may be 0
            mask_labels.append(torch.from_numpy(self.pad([masks], pad_size=target)[0]))
            class_labels.append(torch.from_numpy(classes[kept]))
        return mask_labels, class_labels

    # ---- post-processing ----

    def image_geometry(self, original_sizes) -> list[ImageGeometry]:
        """Where each image of a batch of the given original (height, width) sizes goes in pre-processing with this
        processor's settings."""
        originals = [tuple(int(v) for v in original) for original in original_sizes]
        for original in originals:
            if len(original) != 2 or min(original) < 1:
                raise ValueError(f"target_sizes must hold (height, width) pairs of positive sizes, got {original}")
        contents = [content_size(original, self.do_resize, self.size) for original in originals]
        padded = padded_size(contents, self.do_pad, self.pad_size, self.size_divisor)
        return [ImageGeometry(original, content, padded) for original, content in zip(originals, contents)]

    def _geometry_of(self, target_sizes, maps: torch.Tensor) -> list[ImageGeometry]:
        """The geometry of every image of a batch of output maps (B, ..., h, w), checked against the maps."""
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        if target_sizes is None or len(target_sizes) != maps.shape[0]:
            count = "no" if target_sizes is None else len(target_sizes)
            raise ValueError(
                f"target_sizes has {count} entries but the outputs hold {maps.shape[0]} images: pass the original "
                "(height, width) of every image of the batch"
            )
        geometry = self.image_geometry(target_sizes)
        padded_h, padded_w = geometry[0].padded
        height, width = maps.shape[-2:]
        if padded_h * width != padded_w * height:
            raise ValueError(
                f"outputs of spatial size {height}x{width} cannot cover the {padded_h}x{padded_w} input that this "
                f"processor makes of images of sizes {target_sizes}: pass the original sizes of the whole batch and "
                "post-process with the settings the inputs were prepared with"
            )
        return geometry

    def post_process_semantic_segmentation(self, outputs, target_sizes) -> list[torch.Tensor]:
        """Class maps at the original size: a list of (H, W) int64 tensors, one per image.

        Args:
            outputs: semantic logits (`logits`) or query predictions (`class_queries_logits`, `masks_queries_logits`),
                for example from `sliding_window_inference`.
            target_sizes: the original (height, width) of every image of the batch.
        """
        logits = semantic_logits(outputs)
        geometry = self._geometry_of(target_sizes, logits)
        return [_class_map(image, logits[i]) for i, image in enumerate(geometry)]

    def post_process_instance_segmentation(
        self,
        outputs,
        target_sizes,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float | None = None,
        top_k: int = 100,
        return_binary_masks: bool = True,
    ) -> list[dict]:
        """Instances that may overlap, scored for COCO-style AP (EoMT's protocol), at the original size.

        The `top_k` (query, class) pairs by class probability (no-object left out) become candidates, so one query may
        propose several classes; each mask is its query's sigmoid above `mask_threshold`, and each score is the class
        probability times the mean mask probability inside the mask. Candidates with empty masks or scores below
        `threshold` are dropped (pass `threshold=0` for AP).

        Returns, per image, a dict with
            - `segments_info`: `[{"id", "label_id", "score"}]`, highest score first, `id` = position in the list;
            - `masks` (with `return_binary_masks`): (N, H, W) bool, mask `id` of `segments_info`; masks may overlap;
            - `segmentation`: (H, W) int64 non-overlapping map, each pixel the id of the highest-scoring instance
              covering it, -1 where none does (what `pipeline` and pictures read).

        `overlap_mask_area_threshold` is accepted for `pipeline` compatibility and unused: instances may overlap.
        """
        class_logits, mask_logits = _require_query_predictions(outputs, "instance")
        class_probs = class_logits.softmax(-1)[..., :-1]
        num_classes = class_probs.shape[-1]
        results = []
        for i, image in enumerate(self._geometry_of(target_sizes, mask_logits)):
            pair_probs, pairs = class_probs[i].flatten().topk(min(top_k, class_probs[i].numel()))
            # Masks are computed once per distinct query, then shared by that query's (query, class) pairs.
            queries, pair_query = (pairs // num_classes).unique(return_inverse=True)
            logits = mask_logits[i, queries].float()
            # Scores, and so which instances are kept, are measured at the resolution the model saw, a few queries at
            # a time; only the kept instances are made at the original size. A score is a class probability times a
            # mean probability, at most 1, so pairs whose class probability is below `threshold` are not measured.
            areas = torch.zeros(len(queries), dtype=torch.long, device=logits.device)
            mask_scores = torch.zeros(len(queries), device=logits.device)
            measured = pair_query[pair_probs >= threshold].unique()
            if len(measured):
                areas[measured], mask_scores[measured] = _mask_statistics(
                    image.as_model_input(), logits[measured], mask_threshold
                )
            scores = pair_probs * mask_scores[pair_query]
            keep = ((areas[pair_query] > 0) & (scores >= threshold)).nonzero()[:, 0]
            keep = keep[scores[keep].argsort(descending=True)]
            # Only the kept instances are resampled to the original size, each in the window where it can be on, and
            # painted from the highest score down into pixels no instance has yet, so each pixel ends with the best
            # instance covering it. A window is dropped once its query's last pair is painted, unless masks are asked.
            segmentation = torch.full(image.original, -1, dtype=torch.long, device=mask_logits.device)
            instance_masks = (
                torch.zeros((len(keep), *image.original), dtype=torch.bool, device=mask_logits.device)
                if return_binary_masks
                else None
            )
            pairs_left = torch.bincount(pair_query[keep], minlength=len(queries)).tolist()
            windows, infos = {}, []
            for k in keep.tolist():
                query = int(pair_query[k])
                if query not in windows:
                    windows[query] = _mask_window(image, logits[query], mask_threshold)
                window = windows[query]
                pairs_left[query] -= 1
                if not pairs_left[query]:
                    del windows[query]
                if window is None:  # on at the resolution the model saw, but no pixel of the photo's is
                    continue
                (top, bottom), (left, right), mask = window
                painted = segmentation[top:bottom, left:right]
                painted.masked_fill_(mask & (painted < 0), len(infos))
                if instance_masks is not None:
                    instance_masks[len(infos), top:bottom, left:right] = mask
                infos.append({"id": len(infos), "label_id": int(pairs[k] % num_classes), "score": round(float(scores[k]), 6)})
            result = {"segmentation": segmentation, "segments_info": infos}
            if instance_masks is not None:
                result["masks"] = instance_masks[: len(infos)]
            results.append(result)
        return results

    def post_process_panoptic_segmentation(
        self,
        outputs,
        target_sizes,
        threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        stuff_classes: list[int] | None = None,
    ) -> list[dict]:
        """Non-overlapping segments at the original size, with every stuff class merged into one segment.

        Query predictions (Mask2Former/EoMT merging): queries whose most likely class is not no-object and whose
        probability exceeds `threshold` compete for pixels by score x mask probability; a query keeps the pixels it wins
        where its mask probability is at least `mask_threshold`, and is dropped when it wins less than
        `overlap_mask_area_threshold` of its own mask. Queries of a class in `stuff_classes` (default
        `self.stuff_classes`; pass `[]` to keep them apart) join one segment per class, scored by its best query.

        Semantic logits (models without queries): one segment per class present in the argmax map, scored by the mean
        probability of that class over it. Every segment is kept, so every pixel has its class as in semantic
        post-processing: a semantic model makes no detections to filter, and dropping classes under `threshold` would
        leave holes (`pipeline` asks for panoptic with threshold 0.9 when no subtask is given). `threshold` and the
        thresholds on masks do not apply; filter on the scores if needed.

        Returns, per image, `{"segmentation": (H, W) int64 segment ids, -1 = no segment, "segments_info": [{"id",
        "label_id", "score"}]}`, segments in decreasing score order.
        """
        predictions = _query_predictions(outputs)
        if predictions is None:
            return self._panoptic_from_semantic_logits(semantic_logits(outputs), target_sizes)
        class_logits, mask_logits = predictions
        stuff = set(self.stuff_classes or ()) if stuff_classes is None else set(stuff_classes)
        no_object = class_logits.shape[-1] - 1
        scores, labels = class_logits.softmax(-1).max(-1)
        results = []
        for i, image in enumerate(self._geometry_of(target_sizes, mask_logits)):
            kept = ((labels[i] != no_object) & (scores[i] > threshold)).nonzero()[:, 0]
            kept = kept[scores[i, kept].argsort(descending=True)]
            segmentation = torch.full(image.original, -1, dtype=torch.long, device=mask_logits.device)
            segments = []
            if len(kept):
                logits = mask_logits[i, kept].float()
                # Which queries make segments is decided at the resolution the model saw; only the map of segment ids
                # is made at the original size.
                owned_area, final_area, mask_area = torch.zeros((3, len(kept)), dtype=torch.long, device=logits.device)
                for _, resampled, owner, owner_logit in _pixel_owners(image.as_model_input(), logits, scores[i, kept]):
                    owned_area += torch.bincount(owner.flatten(), minlength=len(kept))
                    final_area += torch.bincount(owner[owner_logit.sigmoid() >= mask_threshold], minlength=len(kept))
                    # Not pruned, so every query is resampled and its whole mask counted.
                    mask_area += (resampled.sigmoid() >= mask_threshold).sum((1, 2))
                segment_of_query, segments = self._merge_panoptic(
                    owned_area, final_area, mask_area, scores[i, kept], labels[i, kept], stuff,
                    overlap_mask_area_threshold,
                )
                if segments:
                    segmentation, segments = _panoptic_map(
                        image, logits, scores[i, kept], segment_of_query, segments, mask_threshold
                    )
            results.append({"segmentation": segmentation, "segments_info": segments})
        return results

    @staticmethod
    def _merge_panoptic(owned_area, final_area, mask_area, scores, labels, stuff, overlap_mask_area_threshold):
        """Segments from n queries sorted by decreasing score, given per query the pixels it wins, those it keeps
        (won where its mask is on) and those of its mask, with its score and label (all (n,)). Returns the segment
        of every query ((n + 1,), -1 for none; the last entry stands for "no query") and the segments' infos."""
        n = len(scores)
        valid = (final_area > 0) & (owned_area >= overlap_mask_area_threshold * mask_area)

        segment_of_query = torch.full((n + 1,), -1, dtype=torch.long, device=scores.device)
        segments, stuff_segment = [], {}
        for k in valid.nonzero()[:, 0].tolist():
            label = int(labels[k])
            if label in stuff_segment:  # later (lower-scoring) queries of a stuff class join its segment
                segment_of_query[k] = stuff_segment[label]
                continue
            segment_of_query[k] = len(segments)
            if label in stuff:
                stuff_segment[label] = len(segments)
            segments.append({"id": len(segments), "label_id": label, "score": round(float(scores[k]), 6)})
        return segment_of_query, segments

    def _panoptic_from_semantic_logits(self, logits, target_sizes) -> list[dict]:
        results = []
        for i, image in enumerate(self._geometry_of(target_sizes, logits)):
            # One pass of row bands: the class map, and per class the pixel count and summed confidence.
            num_classes = logits.shape[1]
            classes = torch.empty(image.original, dtype=torch.long, device=logits.device)
            area = torch.zeros(num_classes, dtype=torch.long, device=logits.device)
            confidence_sum = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
            for start, stop in row_bands(image.original[0], num_classes * image.original[1]):
                band_logits = image.to_original(logits[i : i + 1], rows=(start, stop))[0]
                # The argmax of the logits, not of the probabilities, which rounding can tie: the same classes as
                # semantic post-processing gives.
                band = band_logits.argmax(0)
                confidence = band_logits.softmax(0).gather(0, band[None])[0]
                classes[start:stop] = band
                area += torch.bincount(band.flatten(), minlength=num_classes)
                confidence_sum.index_add_(0, band.flatten(), confidence.flatten().double())
            present = area.nonzero()[:, 0]
            mean_confidence = confidence_sum[present] / area[present]
            order = mean_confidence.argsort(descending=True, stable=True)
            segment_of_class = torch.full((num_classes,), -1, dtype=torch.long, device=logits.device)
            segment_of_class[present[order]] = torch.arange(len(present), device=logits.device)
            segments = [
                {"id": n, "label_id": int(present[k]), "score": round(float(mean_confidence[k]), 6)}
                for n, k in enumerate(order.tolist())
            ]
            results.append({"segmentation": segment_of_class[classes], "segments_info": segments})
        return results

    def post_process_hierarchical_segmentation(self, native_segments, target_sizes) -> list[list[torch.Tensor]]:
        """SeNaTra's native groups as label maps at the original size: per image, one (H, W) int64 map per level of
        the hierarchy (finest first), each pixel the index of the group it belongs to.

        Args:
            native_segments: `model.native_segments(assignments)` of a SeNaTra model: one (B, h, w) map per level on
                the stride-`patch_size` grid of the padded input (`assignments` from `SeNaTraModel` outputs, e.g.
                `model.base_model(pixel_values).assignments` for `SeNaTraForSemanticSegmentation`).
            target_sizes: the original (height, width) of every image of the batch.
        """
        levels = torch.stack(list(native_segments), dim=1)  # (B, levels, h, w)
        results = []
        for i, image in enumerate(self._geometry_of(target_sizes, levels)):
            maps = torch.empty((levels.shape[1], *image.original), dtype=torch.long, device=levels.device)
            for start, stop in row_bands(image.original[0], levels.shape[1] * image.original[1]):
                band = image.to_original(levels[i : i + 1].float(), mode="nearest", rows=(start, stop))[0]
                maps[:, start:stop] = band.long()
            results.append(list(maps))
        return results

    @torch.no_grad()
    def sliding_window_inference(self, model, pixel_values, window_size, stride=None, batch_size: int = 4):
        """Semantic scores of images larger than the model's training size, from overlapping windows (Segmenter and
        EoMT style): windows every `stride` pixels, the last flush with the edge, each run through `model`, its
        per-pixel scores (`semantic_logits`) upsampled to the window and averaged where windows overlap.

        Args:
            model: any of our semantic or query models (in eval mode).
            pixel_values: (B, 3, H, W) from this processor.
            window_size: `int` or (height, width), multiples of `size_divisor`; a side of the image shorter than the
                window is zero-padded to it for the model and cropped back (models with a fixed input size need this).
            stride: `int` or (height, width) between windows, at most the window; defaults to the window (windows
                overlap only where the last one is flush with the edge).
            batch_size: windows per forward pass.

        Returns a `SemanticSegmenterOutput` whose `logits` (B, C, H, W) cover `pixel_values` pixel for pixel, ready for
        `post_process_semantic_segmentation` (or `post_process_panoptic_segmentation`) with the original sizes.
        """
        window = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
        step = window if stride is None else ((stride, stride) if isinstance(stride, int) else tuple(stride))
        if any(w < 1 or w % self.size_divisor for w in window):
            raise ValueError(f"window_size {window} must be positive multiples of size_divisor {self.size_divisor}")
        if any(s < 1 or s > w for s, w in zip(step, window)):
            raise ValueError(f"stride {step} must be positive and at most the window {window}, or pixels are skipped")
        batch, _, height, width = pixel_values.shape
        windows = [
            (b, top, left)
            for b in range(batch)
            for top in _window_starts(height, window[0], step[0])
            for left in _window_starts(width, window[1], step[1])
        ]
        sums, counts = None, pixel_values.new_zeros(batch, 1, height, width)
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            crops = torch.stack([
                F.pad(pixel_values[b, :, top : top + window[0], left : left + window[1]],
                      (0, max(window[1] - width, 0), 0, max(window[0] - height, 0)))
                for b, top, left in chunk
            ])
            scores = semantic_logits(model(pixel_values=crops))
            scores = F.interpolate(scores, size=window, mode="bilinear", align_corners=False)
            if sums is None:
                sums = pixel_values.new_zeros(batch, scores.shape[1], height, width)
            for (b, top, left), score in zip(chunk, scores):
                rows, cols = min(window[0], height), min(window[1], width)
                sums[b, :, top : top + rows, left : left + cols] += score[:, :rows, :cols]
                counts[b, :, top : top + rows, left : left + cols] += 1
        return SemanticSegmenterOutput(logits=sums / counts)


__all__ = ["SeNaTraImageProcessor", "ImageGeometry"]
