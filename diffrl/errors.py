"""The errors a user can fix. Each message is one line naming the key, file, line, shape or reward
at fault; ``diffrl`` commands print it (no traceback) and exit with status 2.

The table of messages and their fixes is docs/errors.md.
"""

from __future__ import annotations

import signal
from pathlib import Path


class DiffrlError(Exception):
    """Base of every error caused by input (configs, files, models, rewards) rather than a bug."""


class ConfigError(DiffrlError, ValueError):
    """A config key, type or value is wrong; the message names the key."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"key: message"`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


class InputFileError(DiffrlError, ValueError):
    """A file the user supplied (prompts, preferences, labels) is missing, empty or malformed;
    the message names the file and, for line-based files, the line."""


class PipelineNotFoundError(DiffrlError, OSError):
    """The named pipeline is neither built in, a local diffusers folder, nor in the hub cache."""


class RewardError(DiffrlError, ValueError):
    """A reward raised, timed out, or returned something that is not a finite float tensor ``[B]``;
    the message names the reward and the sample indices.

    ``indices`` are the failed samples (when known); ``values`` the batch's rewards when only some
    samples are non-finite.
    """

    def __init__(self, message: str, indices: list[int] | None = None, values=None):
        super().__init__(message)
        self.indices, self.values = indices, values


class NumericalError(DiffrlError, RuntimeError):
    """Training produced non-finite values too many steps in a row, or stored log-probabilities do
    not re-score to ratio 1; the message says what and where."""


class RunStopped(Exception):
    """A training run stopped on SIGINT/SIGTERM after saving a checkpoint (not an error:
    ``diffrl train --resume RUN_DIR`` continues it)."""

    def __init__(self, signum: int, run_dir: Path, epoch: int):
        self.signum, self.run_dir, self.epoch = signum, run_dir, epoch
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after epoch {epoch} (checkpoint saved); "
            f"continue with: diffrl train --resume {run_dir}"
        )


class AwaitingLabels(Exception):
    """D3PO with human preferences reached an epoch whose saved rollouts are not all labeled yet
    (not an error: label them with ``diffrl label RUN_DIR``, then ``diffrl train --resume RUN_DIR``)."""

    def __init__(self, run_dir: Path, epoch: int, missing: int, total: int):
        self.run_dir, self.epoch, self.missing, self.total = run_dir, epoch, missing, total
        super().__init__(
            f"epoch {epoch}: {missing} of {total} rollout groups in {Path(run_dir) / 'rollouts'} have no "
            f"label yet; label them with: diffrl label {run_dir}   then continue with: "
            f"diffrl train --resume {run_dir}"
        )
