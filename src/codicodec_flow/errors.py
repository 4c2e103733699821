"""Project exceptions: each message tells the user which file or setting is wrong and what to do."""


class FlowError(Exception):
    """A user-facing problem; the CLI prints its message on one line and exits non-zero."""


class CodecError(FlowError):
    """The codec could not be loaded or used."""


class AudioError(FlowError):
    """An audio file could not be read or is unusable."""


class DataError(FlowError):
    """A latent folder, shard or manifest is missing or malformed."""


class CheckpointError(FlowError):
    """A checkpoint is missing, truncated or incompatible."""
