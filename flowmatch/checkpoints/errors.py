"""The one error of checkpoint handling."""


class CheckpointError(ValueError):
    """A checkpoint path that is missing, unreadable, or not a flowmatch model."""
