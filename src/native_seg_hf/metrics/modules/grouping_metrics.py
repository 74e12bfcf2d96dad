"""`evaluate` module: achievable segmentation accuracy, boundary recall and undersegmentation error of
predicted segments against one or more human segmentations per image (BSDS500).

Load it offline by path: `native_seg_hf.metrics.load_metric("grouping_metrics")`. It wraps
`native_seg_hf.metrics.grouping.grouping_metrics`, where the definitions are.
"""

import datasets

from native_seg_hf.metrics import evaluate_base, grouping


class GroupingMetrics(evaluate_base.ImageMetric):
    compute_function = staticmethod(grouping.grouping_metrics)
    FEATURES = datasets.Features({"predictions": datasets.Image(), "references": datasets.List(datasets.Image())})
    CITATION = """\
@article{stutz2018superpixels,
  title={Superpixels: An Evaluation of the State-of-the-Art},
  author={Stutz, David and Hermans, Alexander and Leibe, Bastian},
  journal={Computer Vision and Image Understanding},
  volume={166}, pages={1--27}, year={2018}
}
@inproceedings{liu2011entropy,
  title={Entropy Rate Superpixel Segmentation},
  author={Liu, Ming-Yu and Tuzel, Oncel and Ramalingam, Srikumar and Chellappa, Rama},
  booktitle={CVPR}, pages={2097--2104}, year={2011}
}
@inproceedings{neubert2012superpixel,
  title={Superpixel Benchmark and Comparison},
  author={Neubert, Peer and Protzel, Peter},
  booktitle={Forum Bildverarbeitung}, year={2012}
}
"""

    def prepare(self, column, value, what):
        """Each image's references are its human segmentations, a list of label images."""
        if column == "references":
            segmentations = grouping.human_segmentations(value, what)
            return [
                evaluate_base.label_image(truth, f"{what}, human segmentation {k}")
                for k, truth in enumerate(segmentations)
            ]
        return super().prepare(column, value, what)
