"""Errors raised by fusegrad. Every message names the op, file or value at fault."""


class FusegradError(Exception):
    """Base class for fusegrad's own errors."""


class ShapeError(FusegradError, ValueError):
    """An op got inputs whose shapes or dtypes break its contract.

    >>> import fusegrad as fg
    >>> fg.tensor([[1., 2., 3.]]) @ fg.tensor([[1., 2.]])
    Traceback (most recent call last):
    ...
    fusegrad.core.errors.ShapeError: matmul: inner dimensions differ: a is (1, 3), b is (1, 2)
    """


class GraphError(FusegradError, RuntimeError):
    """The autograd graph cannot be walked (already released by an earlier backward)."""


class BackendError(FusegradError, RuntimeError):
    """A backend could not run a kernel (unavailable device, failed compile, ...)."""


class FormatError(FusegradError, ValueError):
    """A file (checkpoint, tokenizer, data shard, adapter) is missing, corrupt or of the wrong kind."""


class ConfigError(FusegradError, ValueError):
    """A setting or argument is wrong (unknown preset, a value out of range, an unknown key): the message
    names the setting, its value and what is allowed.

    >>> raise ConfigError("train: lr must be > 0, got -1.0")
    Traceback (most recent call last):
    ...
    fusegrad.core.errors.ConfigError: train: lr must be > 0, got -1.0
    """


class StorageError(FusegradError, OSError):
    """A file could not be written or read back from disk (disk full, read-only or unwritable directory);
    the message names the path and the reason, and the previous file at that path is left as it was."""

    def __str__(self):  # the message alone, without OSError's "[Errno 28]"
        return self.strerror or super().__str__()
