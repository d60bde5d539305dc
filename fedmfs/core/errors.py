"""Domain exceptions. Each carries the process exit code a CLI should use."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "FedMFSError", "ManifestError", "PayloadError"]


class FedMFSError(Exception):
    exit_code = 1


class ConfigError(FedMFSError):
    """A config file or option is wrong; the message names the key and how to fix it."""

    exit_code = 2


class DataError(FedMFSError):
    """A data file is missing, malformed or inconsistent with its spec."""

    exit_code = 3


class PayloadError(FedMFSError):
    """A model payload (bytes from the wire or disk) is malformed; never trusted, never unpickled."""

    exit_code = 4


class ManifestError(FedMFSError):
    """A model-set directory does not match its manifest."""

    exit_code = 5
