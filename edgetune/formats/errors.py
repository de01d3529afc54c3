"""Errors raised by edgetune. The CLI turns these into one-line messages and exit code 1."""
from __future__ import annotations


class EdgetuneError(Exception):
    """Base class of every error edgetune reports to a user."""


class ConfigError(EdgetuneError):
    """A configuration key or value is unknown or out of range."""


class ModelError(EdgetuneError):
    """A model name, file or checksum is wrong."""


class DataError(EdgetuneError):
    """A dataset file is missing, empty or malformed."""


class BundleError(EdgetuneError):
    """A bundle or run directory is missing files or does not match its manifest."""


class DeviceError(EdgetuneError):
    """A device name is unknown or its execution provider is not installed."""


class TrainingError(EdgetuneError):
    """Training cannot continue (a non-finite loss, say)."""


class MergeError(EdgetuneError):
    """A merge produced bad values or was given mismatched tensors."""
