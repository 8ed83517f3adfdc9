"""Entry point for multi-process training; runs the same function as ``diffrl train``.

accelerate launch --num_processes 8 scripts/train.py configs/ddpo/sd15_aesthetic.yaml
torchrun --nproc_per_node 2 scripts/train.py configs/ddpo/tiny_compressibility.yaml
"""

import sys

from diffrl.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
