"""User-facing errors: the CLI prints these as one readable message (no traceback) and exits non-zero."""


class SprintjaxError(Exception):
    """Base class for errors caused by the user's input (files, configs, shapes), not by a bug."""


class ConfigError(SprintjaxError, ValueError):
    """A configuration that cannot describe a valid model or run."""


class CheckpointError(SprintjaxError):
    """A checkpoint or weights folder that is missing, corrupt, or does not match the model."""


class ShapeError(SprintjaxError, ValueError):
    """Input arrays whose shapes do not fit the model or each other."""
