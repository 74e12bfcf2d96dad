"""native_seg_hf: native image segmentation with vision transformers, as Hugging Face Transformers models.

Importing the package registers every config, model and image processor with the Transformers Auto classes
(model types `senatra` and `segmenter`), and marks them for remote code so saved folders load with
`trust_remote_code=True` where this package is not installed.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageSegmentation,
    AutoModelForSemanticSegmentation,
    AutoModelForUniversalSegmentation,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .models.configuration_segmenter import SegmenterConfig
from .models.configuration_senatra import SENATRA_PRESETS, SeNaTraConfig
from .models.configuration_senatra_zero_shot import SeNaTraZeroShotConfig
from .models.image_processing_senatra import SeNaTraImageProcessor
from .models.modeling_segmenter import SegmenterForSemanticSegmentation, SegmenterPreTrainedModel
from .models.modeling_senatra import (
    SeNaTraBackbone,
    SeNaTraForImageClassification,
    SeNaTraForSemanticSegmentation,
    SeNaTraForUniversalSegmentation,
    SeNaTraModel,
    SeNaTraModelOutput,
    SeNaTraPreTrainedModel,
)
from .models.modeling_senatra_zero_shot import SeNaTraForZeroShotSegmentation
from .models.pipeline_zero_shot_image_segmentation import PIPELINE_TASK, ZeroShotImageSegmentationPipeline
from .models.processing_senatra_zero_shot import SeNaTraZeroShotProcessor
from .training import MaskAnnealingCallback, set_mask_annealing

__version__ = "0.1.0"


def _register(config_class, model_classes: dict) -> None:
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    for auto_class, model_class in model_classes.items():
        auto_class.register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


_register(
    SeNaTraConfig,
    {
        AutoModel: SeNaTraModel,
        AutoBackbone: SeNaTraBackbone,
        AutoModelForImageClassification: SeNaTraForImageClassification,
        AutoModelForSemanticSegmentation: SeNaTraForSemanticSegmentation,
        AutoModelForUniversalSegmentation: SeNaTraForUniversalSegmentation,
        # pipeline("image-segmentation") loads by path only through this class (or the semantic one)
        AutoModelForImageSegmentation: SeNaTraForUniversalSegmentation,
    },
)
# Segmenter has no head-less base model: AutoModel gives the whole model, as the DESIGN contract asks.
_register(
    SegmenterConfig,
    {AutoModel: SegmenterForSemanticSegmentation, AutoModelForSemanticSegmentation: SegmenterForSemanticSegmentation},
)
# One processor for both model types; PIL/numpy only, as torchvision may be absent.
for _config_class in (SeNaTraConfig, SegmenterConfig):
    AutoImageProcessor.register(_config_class, image_processor_classes={"pil": SeNaTraImageProcessor}, exist_ok=True)
SeNaTraImageProcessor.register_for_auto_class()
# Zero-shot segmentation: the dual encoder, its processor (image processor + tokenizer) and its pipeline task.
_register(SeNaTraZeroShotConfig, {AutoModel: SeNaTraForZeroShotSegmentation})
AutoImageProcessor.register(SeNaTraZeroShotConfig, image_processor_classes={"pil": SeNaTraImageProcessor}, exist_ok=True)
AutoProcessor.register(SeNaTraZeroShotConfig, SeNaTraZeroShotProcessor, exist_ok=True)
SeNaTraZeroShotProcessor.register_for_auto_class()
PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK, pipeline_class=ZeroShotImageSegmentationPipeline, pt_model=AutoModel, type="multimodal"
)

__all__ = [
    "SENATRA_PRESETS",
    "SeNaTraConfig",
    "SeNaTraModel",
    "SeNaTraModelOutput",
    "SeNaTraPreTrainedModel",
    "SeNaTraBackbone",
    "SeNaTraForImageClassification",
    "SeNaTraForSemanticSegmentation",
    "SeNaTraForUniversalSegmentation",
    "MaskAnnealingCallback",
    "set_mask_annealing",
    "SeNaTraImageProcessor",
    "SegmenterConfig",
    "SegmenterPreTrainedModel",
    "SegmenterForSemanticSegmentation",
    "SeNaTraZeroShotConfig",
    "SeNaTraForZeroShotSegmentation",
    "SeNaTraZeroShotProcessor",
    "ZeroShotImageSegmentationPipeline",
]
