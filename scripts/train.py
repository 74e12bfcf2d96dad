"""Train a segmentation model with Accelerate on a `datasets` source (streamed by default), evaluate, save.

    python scripts/train.py --dataset ~/.cache/native_seg_hf/data/camvid --max_steps 2000
    accelerate launch --num_processes 2 --cpu scripts/train.py --dataset ... [same flags]

Models: senatra (native semantic head), senatra-universal and eomt (query models with mask annealing; tasks
semantic, instance, panoptic), segmenter. The training split is streamed (--streaming, default on) and split
between processes; checkpoints (--save_steps) hold the stream position, so --resume_from_checkpoint latest continues
the same run with no sample skipped or repeated. --push_to_hub --hub_model_id NAME publishes the model, its
processor, remote code and a model card. Every flag: --help. The logic lives in native_seg_hf.training.
"""

from argparse import RawDescriptionHelpFormatter

from transformers import HfArgumentParser

from native_seg_hf.training.hub import finish_run
from native_seg_hf.training.loop import TrainArguments, train

if __name__ == "__main__":
    parser = HfArgumentParser(TrainArguments, description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    args = parser.parse_args_into_dataclasses()[0]
    finish_run(train(args), args)
