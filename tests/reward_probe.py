"""A reward for the multi-process test: image brightness, also appended to a per-rank log file."""

import json
import os


def logged_brightness(images, prompts, metadata):
    values = images.mean(dim=(1, 2, 3))
    path = os.path.join(os.environ["DIFFRL_PROBE_DIR"], f"rewards_rank{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(values.tolist()) + "\n")
    return values
