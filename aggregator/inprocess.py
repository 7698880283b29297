"""An in-process `fedcore.Transport`: a client talking to an `Aggregator` directly.

Simulation runs whole federations in one process through this transport, with
the same service code and the same wire format as over HTTP, minus the
network. Updates are still serialized to safetensors, hashed, validated and
stored, so what works in simulation works on the wire; only parsing the
bytes back is skipped, since the transport wrote them itself.
"""

from __future__ import annotations

from aggregator.service import Aggregator
from fedcore import UPDATE_META_KEY, ParameterSet, Receipt, Task, UpdateMeta, wire

__all__ = ["InProcessTransport"]


class InProcessTransport:
    """A `fedcore.Transport` bound to one client of an in-process aggregator."""

    def __init__(self, aggregator: Aggregator, client_id: str) -> None:
        self._aggregator = aggregator
        self.client_id = client_id

    def fetch_task(self, federation_id: str) -> Task:
        """Check in and return the next task."""
        return self._aggregator.next_task(self.client_id, federation_id)

    def fetch_model(self, federation_id: str, version: str) -> ParameterSet:
        """Return the parameters of model `version` (read-only views)."""
        return self._aggregator.load_model(federation_id, version)

    def submit_update(
        self, federation_id: str, round_number: int, delta: ParameterSet, meta: UpdateMeta
    ) -> Receipt:
        """Serialize the update as on the wire and submit it.

        The service hashes and stores these bytes, and parses the metadata and
        validates and folds the tensors they hold, which it gets as read-only
        views of the bytes instead of parsing the header back.
        """
        metadata = {UPDATE_META_KEY: meta.model_dump_json()}
        data, views = wire.encode_views(delta, metadata)
        staged = self._aggregator.blobs.stage(len(data))
        staged.write(data)
        submitted = self._aggregator.submit_decoded(
            self.client_id, federation_id, round_number, staged, (views, metadata)
        )
        return submitted.receipt

    def submit_encoded(
        self, federation_id: str, round_number: int, data: bytes | memoryview
    ) -> Receipt:
        """Submit an update already in the wire format, as the HTTP route does.

        The service hashes, parses and validates the bytes, stores and folds
        them; the caller's buffer is copied, not kept.
        """
        staged = self._aggregator.blobs.stage(len(data))
        staged.write(data)
        submitted = self._aggregator.submit_update(
            self.client_id, federation_id, round_number, staged
        )
        return submitted.receipt

    def fetch_secagg(self, federation_id: str, round_number: int, stage: str) -> bytes | None:
        """Return the server message that opens `stage` for this client, or None (not yet)."""
        return self._aggregator.fetch_secagg(self.client_id, federation_id, round_number, stage)

    def send_secagg(self, federation_id: str, round_number: int, stage: str, data: bytes) -> None:
        """Send this client's message for `stage` (durable on return)."""
        self._aggregator.send_secagg(self.client_id, federation_id, round_number, stage, data)
