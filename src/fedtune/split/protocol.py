"""The split-session protocol: the client and server endpoints a backend provides, and the messages between them.

A session is one client's local training in a round. Its driver (:func:`fedtune.split.driver.drive_session`) only
relays :class:`~fedtune.comm.messages.Message` objects between two endpoints; where the endpoints run (both in this
process, a Ray worker each, or a client organisation's machine and the server's) is the backend's business.

Per step, standard split::

    client.forward()            -> activations (+ attention mask, labels)          up
    server.step(activations)    -> gradients at the cut, or a step failure        down
    client.backward(gradients)  -> None, or a step failure (the client stepped)

U-shape (labels and the loss stay on the client)::

    client.forward()                 -> activations (+ attention mask)            up
    server.forward(activations)      -> body output                                down
    client.tail(body output)         -> gradients at the body output, or failure  up
    server.backward(tail gradients)  -> gradients at the cut                       down
    client.backward(gradients)       -> None, or a step failure

A step failure (non-finite loss or gradient norm) is a ``step_failure`` message naming why; the driver then aborts
both ends and the client's update is rejected. ``finish`` ends a session: the client uploads its blocks' LoRA
weights (or a ``client_failure`` notice), the server hands back its body blocks' weights. Each side's compression
counts and reuse-cache entries come back as a :class:`SideReport` when the side ran outside the driver's process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypedDict

import torch

from fedtune.comm.messages import Message

TensorDict = dict[str, torch.Tensor]

#: The keys of a session's turn state that are the client's own (``Paradigm.private_state``): its data position.
SESSION_PRIVATE_STATE = ("stream",)

#: Kind of the message that ends a step which cannot go on (its ``meta["reason"]`` says why).
STEP_FAILURE = "step_failure"


def step_failure(reason: str) -> Message:
    return Message(STEP_FAILURE, meta={"reason": reason})


def failed(message: Message | None) -> str | None:
    """The reason of a step failure message (None for any other message, or none)."""
    return message.meta["reason"] if message is not None and message.kind == STEP_FAILURE else None


class StepInfo(TypedDict):
    """What the client tells the driver (not the server's model) about a step: its size and samples."""

    tokens: int
    seq: int
    rows: list[int]  # the samples' ids (the reuse caches are keyed by them)
    epoch: int  # the client's data epoch (reuse counts are kept per epoch)


@dataclass
class SideReport:
    """What a side that ran in another process's copy of the channels hands back for the driver's channels."""

    sends: list[tuple[str, int, int, int]]  # (interface, samples sent, samples offered, epoch) per message
    caches: dict | None  # the side's reuse-cache entries of the samples the session touched (``export_caches``);
    # None: they stay on the side's machine (a deployed client)


@dataclass
class ClientResult:
    upload: Message  # the client's blocks ("client_adapter") or a "client_failure" notice, as the server received it
    peak_memory: int
    stream: dict  # the client's data-stream position after the session
    report: SideReport | None = None


@dataclass
class ServerResult:
    body: TensorDict  # the server's body-block LoRA weights after the session
    peak_memory: int
    report: SideReport | None = None


class ClientEndpoint(Protocol):
    def forward(self) -> tuple[Message, StepInfo]: ...

    def tail(self, body: Message) -> tuple[Message, float]: ...

    def backward(self, grads: Message) -> Message | None: ...

    def abort(self) -> None: ...

    def finish(self, failure: str | None, mean_loss: float) -> ClientResult: ...


class ServerEndpoint(Protocol):
    def step(self, up: Message, info: StepInfo) -> tuple[Message, float]: ...

    def forward(self, up: Message, info: StepInfo) -> Message: ...

    def backward(self, tail_grads: Message) -> Message: ...

    def abort(self, lost: bool = False) -> None: ...

    def finish(self) -> ServerResult: ...
