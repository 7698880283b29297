"""The `Strategy` protocol: how a round's updates become the next model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

from fedcore.parameters import Array, ParameterSet

__all__ = ["Aggregate", "Strategy"]

AggregateT = TypeVar("AggregateT", bound="Aggregate")


class Aggregate(Protocol):
    """A round's running aggregate, folded one update at a time."""

    @property
    def count(self) -> int:
        """Number of updates folded so far."""
        ...

    @property
    def total_weight(self) -> float:
        """Sum of the weights folded so far."""
        ...

    def add(self, delta: Mapping[str, Array], weight: float) -> None:
        """Fold one client's delta with its weight (e.g. its number of examples)."""
        ...


class Strategy(Protocol[AggregateT]):
    """Turns a round's updates into the next model version.

    `begin` opens an empty aggregate for a model; `finish` turns the model and
    the folded aggregate into the next model. Both are pure: no I/O.
    """

    def begin(self, model: ParameterSet) -> AggregateT:
        """Return an empty aggregate for updates of `model`."""
        ...

    def finish(self, model: ParameterSet, aggregate: AggregateT) -> ParameterSet:
        """Return the next model from `model` and the round's `aggregate`."""
        ...
