"""`evaluate` module: mean IoU that ignores an index and negative labels (Trainer's -100 padding).

Load it offline by path: `native_seg_hf.metrics.load_metric("mean_iou")` or `evaluate.load(<this file>)`.
It wraps `native_seg_hf.metrics.semantic.mean_iou`, so the copy evaluate makes in its module cache runs the
installed package's code.
"""

import datasets

from native_seg_hf.metrics import evaluate_base, semantic


class MeanIou(evaluate_base.ImageMetric):  # evaluate names a module after its class: mean_iou
    compute_function = staticmethod(semantic.mean_iou)
    FEATURES = datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()})
    CITATION = """\
@article{everingham2010pascal,
  title={The Pascal Visual Object Classes (VOC) Challenge},
  author={Everingham, Mark and Van Gool, Luc and Williams, Christopher K. I. and Winn, John and Zisserman, Andrew},
  journal={International Journal of Computer Vision},
  volume={88}, number={2}, pages={303--338}, year={2010}
}
"""
