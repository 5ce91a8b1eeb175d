"""Exceptions that fedtune reports to the user as one clear message, never a traceback."""


class FedtuneError(Exception):
    """Base class for errors with a message meant for the user."""


class ConfigError(FedtuneError):
    """The configuration is invalid: unknown key, wrong type or impossible value."""


class DataError(FedtuneError):
    """The data cannot be loaded, formatted or partitioned as asked."""


class PartitionError(DataError):
    """A partition cannot satisfy its constraints (e.g. a minimum number of samples per client)."""


class CheckpointError(FedtuneError):
    """A checkpoint is missing, corrupt, or belongs to a different run configuration."""


class TrainingError(FedtuneError):
    """Training cannot go on (e.g. the loss diverged where no update can be dropped)."""
