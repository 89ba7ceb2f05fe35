"""User-facing errors.

Anything a user can cause by what they wrote (a recipe, a data file, a model path, a reward) raises a subclass of
`TokenwiseError`; the CLI prints its message as one line and exits with status 2, without a traceback. The message
must say where (file, key, column, prompt) and what would be valid.
"""


class TokenwiseError(Exception):
    """Base class of errors the CLI reports as one line."""


class ConfigError(TokenwiseError):
    """A recipe or a command-line override is invalid."""


class DataError(TokenwiseError):
    """A data set is missing, unreadable or lacks a column."""


class ModelLoadError(TokenwiseError):
    """A model or tokenizer directory cannot be loaded."""


class RewardError(TokenwiseError):
    """A reward function raised on a rollout; the step fails with the prompt and the reward's name."""


class CheckpointError(TokenwiseError):
    """A run directory has no usable checkpoint or does not match the command."""


class ClusterError(TokenwiseError):
    """An actor died, hung past its timeout, or the cluster cannot place the actors the recipe asks for."""


class NonFiniteError(TokenwiseError):
    """A reward, advantage, loss, gradient norm or weight is NaN or infinite; the step stops before the optimizer
    and before any checkpoint."""


class RewardCallFailed(Exception):
    """One call of a reward that runs elsewhere (trainer/reward_process.py) failed: `index` into the batch (-1: while
    loading), `reason` in one line, `detail` its traceback. compute_rewards turns it into a RewardError."""

    def __init__(self, index: int, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.index, self.reason, self.detail = index, reason, detail


class EnvError(TokenwiseError):
    """An environment (rollout.env) raised, or answered with something that is not a StepResult; the step fails with
    the environment, the call and the prompt."""
