"""The error every reader of model files raises: what is wrong, and what is allowed (nodes show it as is)."""


class CheckpointError(ValueError):
    """A model folder, weight file or config is missing, malformed or of the wrong kind."""
