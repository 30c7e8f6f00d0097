"""The one exception type checkpoint I/O raises: its message names the file, the key and the problem."""


class CheckpointError(ValueError):
    pass
