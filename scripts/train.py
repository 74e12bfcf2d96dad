"""Train a segmentation model with Accelerate on a `datasets` source (streamed by default), evaluate, save.

    python scripts/train.py --dataset ~/.cache/native_seg_hf/data/camvid --max_steps 2000
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/train.py --dataset ... [same flags]
    accelerate launch --multi_gpu --num_processes 8 scripts/train.py --dataset ...      # 8 GPUs

(Two CPU processes need the multi-process launcher as above: in accelerate 1.15 "--cpu --num_processes 2" starts
one process.) With the project's virtualenv, call .venv/bin/python and .venv/bin/accelerate, or activate it first.

Models: senatra (native semantic head), senatra-universal and eomt (query models with mask annealing; tasks
semantic, instance, panoptic), segmenter. The training split is streamed (--streaming, default on) and split
between processes; checkpoints (--save_steps, written atomically) hold the stream position, so
--resume_from_checkpoint latest continues the same run with no sample skipped or repeated (with the same number of
processes), from the newest complete checkpoint even after a kill -9 mid-save. --model_name_or_path FOLDER
fine-tunes a saved model on the dataset's labels (a new head where they differ; --change_head to start a SeNaTra
task model from a checkpoint of another task, e.g. senatra-universal from a semantic model). --push_to_hub --hub_model_id NAME publishes the model, its
processor, remote code and a model card. Every flag: --help. The logic lives in native_seg_hf.training.

Zero-shot (text-supervised, no masks): --model senatra-zero-shot with --text_column CAPTIONS (image-text data) or
--captions_from_labels (captions written from each crop's classes); see native_seg_hf.training.image_text.
"""

from argparse import RawDescriptionHelpFormatter

from transformers import HfArgumentParser

from native_seg_hf.training.hub import finish_run
from native_seg_hf.training.image_text import ZERO_SHOT_MODEL, ImageTextArguments, train_image_text
from native_seg_hf.training.loop import TrainArguments, train

if __name__ == "__main__":
    parser = HfArgumentParser((TrainArguments, ImageTextArguments), description=__doc__,
                              formatter_class=RawDescriptionHelpFormatter)
    args, image_text_args = parser.parse_args_into_dataclasses()
    if args.model == ZERO_SHOT_MODEL:
        train_image_text(args, image_text_args)  # saves model, processor and all_results.json (no card yet)
    else:
        finish_run(train(args), args)
