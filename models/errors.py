"""The exception hierarchy shared by every part of Affinity.

    AffinityError
    ├── InvalidInputError        bad user input: a request field, a CLI option, a config value
    │   └── DataError            an interaction log or catalog that cannot be used at all
    ├── NotFoundError            an id the model does not know (item, user, model version)
    ├── ArtifactError            a model artifact that cannot be trusted or read
    │   └── UnsupportedFormatError   written by a newer (or unknown) format version
    ├── ModelTooLargeError       a model whose memory need exceeds the configured budget
    ├── NotReadyError            no model is loaded yet
    └── StoreError               the event store cannot be opened or written
        └── UnsupportedSchemaError   its database was written by a newer schema version

The service maps these to gRPC status codes in one interceptor; the CLI prints their message as a
one-line reason and exits non-zero.
"""

from __future__ import annotations


class AffinityError(Exception):
    """Base class of every error Affinity raises on purpose."""


class InvalidInputError(AffinityError, ValueError):
    """The caller passed something invalid; the message names the field and what to do."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DataError(InvalidInputError):
    """An input file is missing, lacks a column, or holds no usable row."""


class NotFoundError(AffinityError, LookupError):
    """An id (item, user, model) that does not exist."""


class ArtifactError(AffinityError):
    """A model artifact is corrupt, incomplete or inconsistent."""


class UnsupportedFormatError(ArtifactError):
    """The artifact's format version is not one this build can read."""


class ModelTooLargeError(AffinityError, MemoryError):
    """Fitting or loading would need more memory than allowed."""


class NotReadyError(AffinityError):
    """The component has no model loaded yet."""


class StoreError(AffinityError):
    """The event store's database cannot be opened, migrated or written."""


class ConflictError(AffinityError):
    """A request that the stored state does not allow now (another experiment is running)."""


class UnsupportedSchemaError(StoreError):
    """The event store's database has a schema newer than this build knows; upgrade Affinity."""
