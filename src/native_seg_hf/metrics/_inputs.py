"""Input checks shared by the metrics: every problem is a ValueError that names the metric and the item."""

from collections.abc import Iterable

import numpy as np
import torch


def paired(metric: str, predictions: Iterable, references: Iterable) -> list[tuple]:
    """(prediction, reference) pairs of two equally long, non-empty per-image sequences."""
    predictions, references = list(predictions), list(references)
    if not predictions and not references:
        raise ValueError(f"{metric}: no predictions and no references were given")
    if len(predictions) != len(references):
        raise ValueError(f"{metric}: {len(predictions)} predictions but {len(references)} references")
    return list(zip(predictions, references))


def as_integer_array(value, what: str) -> np.ndarray:
    """`value` (NumPy array, torch tensor on any device, PIL image or nested list) as an integer array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise ValueError(f"{what} must hold integer ids, got dtype {array.dtype}")
    return array


def as_map(value, what: str) -> np.ndarray:
    """`value` as a non-empty 2-D integer array (see `as_integer_array`)."""
    array = as_integer_array(value, what)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{what} must be a non-empty 2-D (height, width) map, got shape {array.shape}")
    return array


def check_same_shape(prediction_shape: tuple, reference_shape: tuple, what: str) -> None:
    if tuple(prediction_shape) != tuple(reference_shape):
        raise ValueError(
            f"{what}: the prediction has shape {tuple(prediction_shape)} but the reference has shape "
            f"{tuple(reference_shape)}"
        )
