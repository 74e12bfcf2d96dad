"""Base class of the package's `evaluate` modules (the scripts in `modules/`, loaded with `load_metric`).

The scripts import this module, not the class: evaluate takes the first metric class it finds in a script's
namespace as the script's metric.
"""

import sys
from collections.abc import Callable

import datasets
import evaluate
import numpy as np
from PIL import Image

from ._inputs import as_map


def label_image(value, what: str) -> Image.Image:
    """A 2-D integer map (ids within int32) as an int32 PIL image, which datasets' `Image` feature stores
    losslessly, as TIFF. Given arrays instead, datasets downcasts int64 ones with a warning and converts
    arrays nested in a list through Python lists, slowly."""
    return Image.fromarray(as_map(value, what).astype(np.int32))


class ImageMetric(evaluate.Metric):
    """An `evaluate.Metric` computed by one of the package's functions, whose inputs pass, image by image and
    column by column, through `prepare()` before datasets stores them, in `add_batch()` (which `compute()`
    calls) and in `add()`.

    Subclasses set `compute_function` (as a staticmethod; evaluate passes it the stored columns and the
    `compute()` arguments by name; its module's docstring describes the metric, its own the inputs),
    `CITATION` (BibTeX) and `FEATURES` (the columns).
    """

    compute_function: Callable[..., dict]
    CITATION: str
    FEATURES: datasets.Features

    def _info(self):
        return evaluate.MetricInfo(
            description=sys.modules[self.compute_function.__module__].__doc__,
            citation=self.CITATION,
            inputs_description=self.compute_function.__doc__,
            features=self.FEATURES,
        )

    def _compute(self, **inputs):
        return self.compute_function(**inputs)

    def prepare(self, column: str, value, what: str):
        """One image's `value` of `column` as its feature stores it; `what` names the image in errors. The
        `predictions` and `references` maps become label images; other columns stay as they are."""
        return label_image(value, f"{what}: {column}") if column in ("predictions", "references") else value

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of images; the inputs are described below."""
        columns = {"predictions": predictions, "references": references, **kwargs}
        super().add_batch(**{column: self._prepared(column, values) for column, values in columns.items()})

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one image: `prediction`, `reference` and the other columns by their names."""
        self.add_batch(
            predictions=[prediction], references=[reference], **{column: [value] for column, value in kwargs.items()}
        )

    def _prepared(self, column: str, values):
        if values is None or column not in self._feature_names():
            return values  # evaluate reports unknown columns
        return [self.prepare(column, value, f"{self.name}: image {index}") for index, value in enumerate(values)]
