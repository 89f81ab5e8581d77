"""Errors with messages meant for the person at the keyboard.

Scripts catch ``FoldstackError`` and print its message instead of a traceback, so every message
names the file, row or argument at fault.
"""


class FoldstackError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class DataError(FoldstackError, ValueError):
    """The dataset on disk is malformed (missing files, bad labels, unreadable images...)."""


class ConfigError(FoldstackError, ValueError):
    """A flag or config key is unknown or has a bad value."""


class RunMismatchError(FoldstackError, ValueError):
    """Runs that cannot be combined: other folds, ids or class order, or incomplete."""


class BusyError(FoldstackError, RuntimeError):
    """Another process holds what this one needs (a fold in training): refuse rather than race."""


class DiskFullError(FoldstackError, OSError):
    """The disk (or a file size limit) ran out while writing; nothing half-written was kept."""


class FetchError(DataError):
    """Data that comes from a package registry (the Fashion-MNIST demo) could not be fetched."""
