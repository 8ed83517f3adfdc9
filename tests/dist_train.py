"""Run by test_distributed under torchrun: train, then save this rank's trainable weights."""

import os
import sys

from safetensors.torch import save_file

from diffrl.checkpoints import trainable_state
from diffrl.cli import resolve_train_config
from diffrl.trainer import train

if __name__ == "__main__":
    pipe = train(resolve_train_config(sys.argv[1], sys.argv[2:], None))
    save_file(
        trainable_state(pipe.unet),
        os.path.join(os.environ["DIFFRL_PROBE_DIR"], f"weights_rank{os.environ['RANK']}.safetensors"),
    )
