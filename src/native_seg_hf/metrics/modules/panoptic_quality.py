"""`evaluate` module: panoptic quality (PQ, SQ, RQ; overall, things, stuff, per category) with COCO's rules.

Load it offline by path: `native_seg_hf.metrics.load_metric("panoptic_quality")`. Per image it takes the
predicted and reference segment-id maps with their `segments_info`; `compute()` takes the `categories`. It
wraps `native_seg_hf.metrics.panoptic.panoptic_quality`, where the rules are.
"""

import datasets

from native_seg_hf.metrics import evaluate_base, panoptic

_SEGMENTS_INFO = datasets.List(
    {"id": datasets.Value("int64"), "category_id": datasets.Value("int64"), "iscrowd": datasets.Value("int8")}
)


class PanopticQuality(evaluate_base.ImageMetric):
    compute_function = staticmethod(panoptic.panoptic_quality)
    FEATURES = datasets.Features(
        {
            "predictions": datasets.Image(),
            "references": datasets.Image(),
            "prediction_segments_info": _SEGMENTS_INFO,
            "reference_segments_info": _SEGMENTS_INFO,
        }
    )
    CITATION = """\
@inproceedings{kirillov2019panoptic,
  title={Panoptic Segmentation},
  author={Kirillov, Alexander and He, Kaiming and Girshick, Ross and Rother, Carsten and Dollár, Piotr},
  booktitle={CVPR}, pages={9404--9413}, year={2019}
}
"""

    def prepare(self, column, value, what):
        """evaluate stores a segments_info entry only if it has exactly the feature's keys: COCO's entries
        also carry "area" and "bbox", predictions lack "iscrowd"."""
        if column.endswith("segments_info"):
            return panoptic.segment_entries(value, f"{what}: {column}")
        return super().prepare(column, value, what)
