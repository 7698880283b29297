"""The `Transport` protocol: how a client talks to an aggregator.

The SDK's HTTP transport (in `clients`) and the aggregator's in-process
transport (for simulation) both satisfy it, so the same client loop runs
over the network and inside one process. Secure aggregation adds one
exchange per SecAgg+ stage (`fetch_secagg`, `send_secagg`), carrying the
encoded messages of `privacy.secagg` as opaque bytes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from fedcore.messages import Receipt, Task, UpdateMeta
from fedcore.parameters import ParameterSet

__all__ = ["EncodedUpload", "Transport"]


class Transport(Protocol):
    """A client's connection to one aggregator, bound to one client identity."""

    def fetch_task(self, federation_id: str) -> Task:
        """Check in and return what to do next (train, wait or stop)."""
        ...

    def fetch_model(self, federation_id: str, version: str) -> ParameterSet:
        """Return the parameters of model `version`."""
        ...

    def submit_update(
        self, federation_id: str, round_number: int, delta: ParameterSet, meta: UpdateMeta
    ) -> Receipt:
        """Upload the delta for `round_number` and return the durable receipt."""
        ...

    def fetch_secagg(self, federation_id: str, round_number: int, stage: str) -> bytes | None:
        """Return the server message that opens `stage` of a secure round for this client.

        For `advertise-keys` that is a `SecAggSetup` as JSON; for the later
        stages the encoded `privacy.secagg` message. None: not ready yet,
        ask again.
        """
        ...

    def send_secagg(self, federation_id: str, round_number: int, stage: str, data: bytes) -> None:
        """Send this client's message for `stage` of a secure round (durable on return)."""
        ...


@runtime_checkable
class EncodedUpload(Protocol):
    """A transport that also takes an update already in the wire format.

    Both of fedcore's transports offer it: a caller that holds the bytes (a
    simulation's training worker encodes the update as a client would
    upload it) submits them as they are instead of decoding and encoding
    them again.
    """

    def submit_encoded(
        self, federation_id: str, round_number: int, data: bytes | memoryview
    ) -> Receipt:
        """Upload an update in the wire format and return the durable receipt.

        `data` is what `submit_update` would send: the delta in safetensors
        (`fedcore.wire`), its `UpdateMeta` as JSON under `UPDATE_META_KEY`
        in the metadata.
        """
        ...
