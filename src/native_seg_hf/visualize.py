"""Pictures of segmentation results, drawn with PIL and numpy only.

- `semantic_overlay(image, segmentation, id2label)`: classes as colours over the image, with a legend;
- `segments_overlay(image, result, id2label)`: a panoptic or instance result of `SeNaTraImageProcessor` (segment
  colours, outlines and a legend with scores; overlapping instance masks are all drawn, best on top);
- `hierarchy_picture(image, level_maps)`: SeNaTra's native groups, one panel per level of the hierarchy, with the
  group boundaries drawn on the image.

Overlays have the image's size (the legend sits in its top-left corner); the hierarchy picture has one image-sized
panel per level, side by side. Results are read at the image's size, as the post-processing returns them.
"""

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ALPHA = 0.55  # weight of the segment colour over the image
BOUNDARY_COLOR = (255, 255, 255)
GROUP_BOUNDARY_COLOR = (255, 220, 0)
MAX_LEGEND_ENTRIES = 12


def label_color(index: int) -> tuple[int, int, int]:
    """A deterministic colour per id; hues step by the golden ratio so that consecutive ids look far apart."""
    hue = (index * 0.618033988749895) % 1.0
    saturation = (0.85, 0.55)[index // 11 % 2]
    value = (0.95, 0.75)[index // 5 % 2]
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def _shade(color: tuple[int, int, int], rank: int) -> tuple[int, int, int]:
    """The rank-th shade of a class colour, so that segments of one class stay apart (rank 0 is the colour)."""
    factor = (1.0, 0.7, 1.25, 0.5, 1.45)[rank % 5]
    return tuple(min(255, round(c * factor)) for c in color)


def _rgb(image) -> np.ndarray:
    """A PIL image or a uint8 array as a float (H, W, 3) RGB array."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _numpy(array) -> np.ndarray:
    return array.cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _map(segmentation, name: str, size: tuple[int, int]) -> np.ndarray:
    """A label map as an int64 numpy array, checked against the image's (height, width)."""
    array = _numpy(segmentation)
    if array.shape != size:
        raise ValueError(f"{name} is {array.shape} but the image is {size} (height, width): post-process to its size")
    return array.astype(np.int64)


def _boundaries(label_map: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label."""
    edge = np.zeros(label_map.shape, dtype=bool)
    edge[:, :-1] |= label_map[:, :-1] != label_map[:, 1:]
    edge[:-1, :] |= label_map[:-1, :] != label_map[1:, :]
    return edge


def _font(height: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, min(24, height // 30)))


def _draw_legend(picture: Image.Image, entries: list[tuple[tuple[int, int, int], str]]) -> None:
    """Colour swatches and names in a translucent box in the top-left corner (the first entries if there are many)."""
    if not entries:
        return
    shown = entries[:MAX_LEGEND_ENTRIES]
    if len(entries) > MAX_LEGEND_ENTRIES:
        shown.append((None, f"+{len(entries) - MAX_LEGEND_ENTRIES} more"))
    font = _font(picture.height)
    text_height = font.getbbox("Ag")[3]  # not font.size: the bitmap fallback font (no FreeType) has none
    line = text_height + 4
    width = max(ImageDraw.Draw(picture).textlength(text, font=font) for _, text in shown) + line + 8
    box = Image.new("RGBA", (int(width), line * len(shown) + 6), (0, 0, 0, 150))
    draw = ImageDraw.Draw(box)
    for row, (color, text) in enumerate(shown):
        top = 3 + row * line
        if color is not None:
            draw.rectangle([4, top + 2, 4 + text_height, top + 2 + text_height], fill=color)
        draw.text((line + 6, top), text, fill=(255, 255, 255), font=font)
    picture.paste(box, (0, 0), box)


def _name(label_id: int, id2label: dict | None) -> str:
    return str(id2label.get(label_id, label_id)) if id2label else str(label_id)


def semantic_overlay(image, segmentation, id2label: dict | None = None) -> Image.Image:
    """The image with each class's pixels tinted by its colour, class borders outlined, and a legend of the classes
    present (largest first). `segmentation` is an (H, W) class map of the image's size."""
    pixels = _rgb(image)
    classes = _map(segmentation, "segmentation", pixels.shape[:2])
    present, index, areas = np.unique(classes, return_inverse=True, return_counts=True)
    colors = np.array([label_color(int(label)) for label in present], dtype=np.float32)
    blended = (1 - ALPHA) * pixels + ALPHA * colors[index.reshape(classes.shape)]
    blended[_boundaries(classes)] = BOUNDARY_COLOR
    picture = Image.fromarray(blended.round().astype(np.uint8))
    order = present[np.argsort(-areas)]
    _draw_legend(picture, [(label_color(int(c)), _name(int(c), id2label)) for c in order])
    return picture


def segment_masks(result: dict) -> list[np.ndarray]:
    """One bool (H, W) mask per entry of a panoptic or instance result's `segments_info`: its `masks` when the result
    has them (instances may overlap), else the pixels of its id in `segmentation`."""
    if "masks" in result:
        return [_numpy(mask).astype(bool) for mask in result["masks"]]
    segmentation = _numpy(result["segmentation"])
    return [segmentation == info["id"] for info in result["segments_info"]]


def segments_overlay(image, result: dict, id2label: dict | None = None) -> Image.Image:
    """The image with every segment of a panoptic or instance result tinted and outlined, and a legend of segments
    with their scores (best first). Segments of one class get shades of its colour; pixels of no segment stay as they
    are. With the overlapping `masks` of an instance result, every mask is drawn, the best on top."""
    pixels = _rgb(image)
    size = pixels.shape[:2]
    infos = result["segments_info"]
    ranks: dict[int, int] = {}
    colors = []
    for info in infos:
        rank = ranks[info["label_id"]] = ranks.get(info["label_id"], -1) + 1
        colors.append(_shade(label_color(info["label_id"]), rank))
    masks = [_map(mask, f"the mask of segment {n}", size).astype(bool) for n, mask in enumerate(segment_masks(result))]
    blended = pixels.copy()
    outline = np.zeros(size, dtype=bool)
    for mask, color in reversed(list(zip(masks, colors))):  # lowest score first, so the best ends on top
        blended[mask] = (1 - ALPHA) * pixels[mask] + ALPHA * np.asarray(color, dtype=np.float32)
        outline |= _boundaries(mask)
    blended[outline] = BOUNDARY_COLOR
    picture = Image.fromarray(blended.round().astype(np.uint8))
    entries = []
    for info, color in zip(infos, colors):
        score = "" if info.get("score") is None else f" {info['score']:.2f}"
        entries.append((color, f"{_name(info['label_id'], id2label)}{score}"))
    _draw_legend(picture, entries)
    return picture


def hierarchy_picture(image, level_maps) -> Image.Image:
    """SeNaTra's native group hierarchy: one panel per level (finest on the left), each the image with its group
    boundaries drawn and the level's number of groups written in the corner. `level_maps` are (H, W) group maps of
    the image's size, as `post_process_hierarchical_segmentation` returns them for one image."""
    pixels = _rgb(image)
    height, width = pixels.shape[:2]
    picture = Image.new("RGB", (width * len(level_maps), height))
    for level, groups in enumerate(level_maps, start=1):
        groups = _map(groups, f"level_maps[{level - 1}]", (height, width))
        panel = pixels.copy()
        panel[_boundaries(groups)] = GROUP_BOUNDARY_COLOR
        panel = Image.fromarray(panel.round().astype(np.uint8))
        _draw_legend(panel, [(GROUP_BOUNDARY_COLOR, f"level {level}: {len(np.unique(groups))} groups")])
        picture.paste(panel, ((level - 1) * width, 0))
    return picture


__all__ = ["label_color", "segment_masks", "semantic_overlay", "segments_overlay", "hierarchy_picture"]
