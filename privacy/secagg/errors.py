"""Errors of the SecAgg+ state machines.

The server half never raises these for a client's message: it excludes the
client and says why. The client half raises `ProtocolViolation` when the
server (or a neighbour, through the server) breaks the protocol, and then
refuses every later call of the round.

::

    FedcoreError
    └── SecAggError
        ├── ProtocolViolation                 a message breaks the protocol; the round is aborted
        │   └── MalformedMessage (ValueError) bytes that do not decode as the expected message
        └── RoundFailed                       too few clients survived to recover the sum
"""

from __future__ import annotations

from fedcore import FedcoreError

__all__ = ["MalformedMessage", "ProtocolViolation", "RoundFailed", "SecAggError"]


class SecAggError(FedcoreError):
    """Base class of the secure aggregation errors."""


class ProtocolViolation(SecAggError):
    """A message breaks the protocol: bad signature, replay, inconsistent sets."""


class MalformedMessage(ProtocolViolation, ValueError):
    """Bytes that do not decode as the expected message."""


class RoundFailed(SecAggError):
    """Too few clients survived a stage for the sum to be recovered."""
