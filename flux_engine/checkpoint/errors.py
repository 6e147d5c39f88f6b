"""The one exception of the checkpoint package."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read or written as asked. Messages name the file and, where one is
    involved, the tensor key or config key."""
