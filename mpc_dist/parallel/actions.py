"""The schedule IR's atoms: action kinds with their properties, actions, and messages.

Compute actions are ``F`` (forward a microbatch through the stage, evaluating its loss points),
``B`` (run one stream of one microbatch through the stage; it deposits the weight gradients the
plan assigns to the stage's blocks on its way), ``W`` (with deferred weights: B computes input
gradients only, and W the stream's weight gradients, later, wherever the stage would idle: the
zero-bubble split), ``G`` (a top-down rule's second forward pass, PEPITA's) and ``S`` (optimizer
step). A lowering pass adds the messages: ``RF``/``SF`` receive/send an activation, ``RB``/``SB``
a stream's cotangent, ``RG``/``SG`` a second-pass activation, ``RT``/``ST`` the top-down message
from the last stage to the first. Each stream is its own unit of work (spec section 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ScheduleError(RuntimeError):
    pass


class MessageKind(str, Enum):
    """What a message carries; the channel is the process group it travels on."""

    ACTIVATION = "F"  # a stage's output, up the pipeline
    COTANGENT = "B"  # a stream's gradient at a stage boundary, down
    SECOND_PASS = "G"  # the modulated activation of a top-down rule's second pass, up
    TOP_DOWN = "T"  # a top-down rule's error, from the last stage to the first

    @property
    def channel(self) -> str:
        """``F``: the group of messages going up; ``B``: going down (or across, top-down)."""
        return "F" if self in (MessageKind.ACTIVATION, MessageKind.SECOND_PASS) else "B"

    def __str__(self) -> str:
        return self.value


class ActionKind(str, Enum):
    """A kind of action; compares equal to its letters (``ActionKind.F == "F"``)."""

    F = "F"
    B = "B"
    W = "W"
    G = "G"
    S = "S"
    RF = "RF"
    SF = "SF"
    RB = "RB"
    SB = "SB"
    RG = "RG"
    SG = "SG"
    RT = "RT"
    ST = "ST"

    def __str__(self) -> str:
        return self.value

    @property
    def is_compute(self) -> bool:
        return len(self.value) == 1

    @property
    def is_send(self) -> bool:
        return self.value[0] == "S" and len(self.value) == 2

    @property
    def is_receive(self) -> bool:
        return self.value[0] == "R"

    @property
    def is_work(self) -> bool:
        """Work on a forwarded microbatch that keeps its activations held until done."""
        return self in (ActionKind.B, ActionKind.W, ActionKind.G)

    @property
    def message_kind(self) -> MessageKind:
        """What a send or receive moves."""
        return MessageKind(self.value[-1])

    @property
    def has_stream(self) -> bool:
        """Whether ``Action.stream`` names a stream (a loss point)."""
        return self in (ActionKind.B, ActionKind.W, ActionKind.RB, ActionKind.SB)


COMPUTE = tuple(k for k in ActionKind if k.is_compute)
SENDS = tuple(k for k in ActionKind if k.is_send)
RECEIVES = tuple(k for k in ActionKind if k.is_receive)


@dataclass(frozen=True, order=True)
class Message:
    """The identity of a message: the same on the sending and the receiving side."""

    kind: MessageKind
    minibatch: int
    microbatch: int
    stream: int  # the loss point of a cotangent; the last stage, for the top-down message

    def __str__(self) -> str:
        return f"{self.kind}{self.minibatch}.{self.microbatch}s{self.stream}"


@dataclass(frozen=True, order=True)
class Action:
    stage: int
    kind: ActionKind
    minibatch: int = 0
    microbatch: int = 0
    stream: int = 0  # loss point, for B / W / RB / SB; the last stage, for RT / ST

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ActionKind):
            object.__setattr__(self, "kind", ActionKind(self.kind))

    def __str__(self) -> str:
        if self.kind == ActionKind.S:
            return f"{self.stage}S{self.minibatch}"
        where = f"{self.minibatch}.{self.microbatch}"
        if self.kind.has_stream:
            where += f"s{self.stream}"
        return f"{self.stage}{self.kind}{where}"

    @property
    def message(self) -> Message:
        """The message a send or receive moves (``F``/``B``/``G`` actions: the message of that
        kind that carries the same microbatch and stream)."""
        letter = self.kind.value[-1]
        kind = MessageKind(letter) if letter in "FBGT" else MessageKind.COTANGENT
        return Message(kind, self.minibatch, self.microbatch, self.stream)

    @property
    def peer(self) -> int:
        """The stage at the other end of a send or receive."""
        kind = self.kind
        if kind == ActionKind.ST:
            return 0
        if kind == ActionKind.RT:
            return self.stream
        up = kind in (ActionKind.SF, ActionKind.RB, ActionKind.SG)
        return self.stage + 1 if up else self.stage - 1


def peer(action: Action) -> int:
    """The stage at the other end of a message action."""
    return action.peer
