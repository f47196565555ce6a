"""The errors a user can act on. Each message names the problem and the fix; entry points print it in one line."""


class DiffattrError(Exception):
    """Base of every expected error: bad input or state, never a bug."""


class ConfigError(DiffattrError, ValueError):
    """A configuration or override that cannot be used; the message names the key and the valid choices."""


class DataError(DiffattrError, ValueError):
    """A dataset that cannot be loaded (missing or corrupt archive, empty selection, ...)."""


class CheckpointError(DiffattrError, RuntimeError):
    """A checkpoint that cannot be read; the message names the directory and the fix."""


class TrainingError(DiffattrError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the last good checkpoint."""


class StageError(DiffattrError, RuntimeError):
    """A stage's input is missing or belongs to another run; the message names the file and the rule to rerun."""


class DiskFullError(DiffattrError, OSError):
    """A write ran out of space; the message names the path. Nothing partial is left, so a rerun finishes the job."""
