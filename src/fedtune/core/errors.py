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


class RoundAbortedError(FedtuneError):
    """A round cannot complete; the runner stops at a checkpoint of the last complete round, to be resumed."""

    def __init__(self, message: str, round: int) -> None:
        super().__init__(message)
        self.round = round


class ClientQuorumError(RoundAbortedError):
    """Too few clients replied in a round (workers died or timed out) even after retries."""


class ServerLostError(RoundAbortedError):
    """The split server's worker died or stopped answering (Ray backend)."""
