"""Run by test_distributed under torchrun: train, then save this rank's trainable weights (under
FSDP the run's checkpoints hold them, gathered).

With ``DIFFRL_TEST_FSDP=1`` (and the environment ``accelerate launch`` makes from
``configs/accelerate/fsdp.yaml``) accelerate applies its FSDP to these CPU processes: accelerate
offers FSDP only on accelerators, so the one concession here is to mark the gloo process group
as multi-GPU before accelerate's state is made; torch's FSDP2 itself runs on the CPU.
"""

import os
import sys

from safetensors.torch import save_file

from diffrl.checkpoints import trainable_state
from diffrl.cli import resolve_train_config
from diffrl.trainer import train
from diffrl.transitions import denoiser

if __name__ == "__main__":
    if os.environ.get("DIFFRL_TEST_FSDP") == "1":
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        PartialState(cpu=True)
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    pipe = train(resolve_train_config(sys.argv[1], sys.argv[2:], None))
    if os.environ.get("DIFFRL_TEST_FSDP") == "1":
        sys.exit(0)  # the process group is gone with the run; its checkpoints hold the whole weights
    save_file(
        trainable_state(denoiser(pipe)),
        os.path.join(os.environ["DIFFRL_PROBE_DIR"], f"weights_rank{os.environ['RANK']}.safetensors"),
    )
