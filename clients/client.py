"""The client loop: check in, train when asked, upload the delta, repeat.

`Client` knows nothing of HTTP: it talks through a `fedcore.Transport`, so the
same loop runs on an edge device (over `HttpTransport`) and inside a
simulation (over the aggregator's in-process transport).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

from clients.secagg import Progress, SecureParticipant
from clients.trainer import Trainer
from fedcore import (
    BudgetExhausted,
    ConfigError,
    EncodedUpload,
    ParameterSet,
    Receipt,
    RoundStateError,
    Task,
    TaskAction,
    TrainConfig,
    Transport,
    TransportError,
    UpdateConflict,
    UpdateMeta,
    wire,
)
from privacy.secagg import ClientIdentity

__all__ = ["Client", "RoundResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RoundResult:
    """What one round of local training produced.

    `receipt` is None when the aggregator no longer took the update (the
    round closed while the client trained), and in secure rounds (`secure`),
    where the client sends only its masked input.
    """

    round: int
    model_version: str
    num_examples: int
    metrics: Mapping[str, float]
    receipt: Receipt | None
    secure: bool = False


class Client:
    """One federated client: a transport, a trainer and a federation id.

    `identity` is the client's Ed25519 identity, registered at enrollment;
    federations with secure aggregation need it, and then the client runs
    the SecAgg+ stages itself (`clients.secagg`): nothing else changes for
    the caller.

    A client whose trainer refuses a round because its privacy budget is
    spent (`BudgetExhausted`, DP-SGD) stops participating: it logs why and
    is `finished` from then on, without checking in again.
    """

    def __init__(
        self,
        transport: Transport,
        trainer: Trainer,
        federation_id: str,
        *,
        identity: ClientIdentity | None = None,
    ) -> None:
        self.transport = transport
        self.trainer = trainer
        self.federation_id = federation_id
        self._secure = (
            None if identity is None else SecureParticipant(identity, transport, federation_id)
        )
        self._model: tuple[str, ParameterSet] | None = None
        self._last_task: Task | None = None
        self._last_result: RoundResult | None = None
        self._stop = threading.Event()
        self._exhausted = False
        # The transport last asked whether it takes encoded updates, and its answer.
        self._takes_encoded: tuple[Transport | None, bool] = (None, False)

    @property
    def last_task(self) -> Task | None:
        """The answer to the latest check-in."""
        return self._last_task

    @property
    def last_result(self) -> RoundResult | None:
        """The latest round this client trained."""
        return self._last_result

    @property
    def finished(self) -> bool:
        """Whether the federation finished, or this client spent its privacy budget."""
        if self._exhausted:
            return True
        return self._last_task is not None and self._last_task.action is TaskAction.FINISHED

    def step(self) -> TaskAction:
        """Check in once and, if asked to, train and upload the update.

        Returns:
            The action of the check-in: `train` (done), `wait` (check in again
            after `last_task.retry_after_s`) or `finished` (also once the
            client's privacy budget is spent; it then no longer checks in).

        Raises:
            FedcoreError: the transport failed or the aggregator refused
                (a round that closed while training is logged, not raised).
        """
        if self._exhausted:
            return TaskAction.FINISHED
        return self.act(self.check_in())

    def check_in(self) -> Task:
        """Check in once and return the task, without acting on it (see `act`)."""
        task = self.transport.fetch_task(self.federation_id)
        self._last_task = task
        return task

    def act(self, task: Task) -> TaskAction:
        """Act on the task of the latest check-in: train and upload, or answer a secure stage.

        `step` is `act(check_in())`; a simulation that trains elsewhere
        hands the result to `submit` instead.
        """
        try:
            if task.action is TaskAction.TRAIN and task.secure:
                return self._secure_step(task)
            if task.action is TaskAction.TRAIN:
                self.submit(task, *self.train(task))
        except BudgetExhausted as exc:
            logger.warning("federation %s: client stops: %s", self.federation_id, exc)
            self._exhausted = True
            return TaskAction.FINISHED
        return task.action

    def run(
        self,
        *,
        on_round: Callable[[RoundResult], None] | None = None,
        max_rounds: int | None = None,
        max_sleep_s: float = 60.0,
    ) -> int:
        """Step until the federation or the client is `finished`, `stop()` or `max_rounds`.

        Args:
            on_round: called with each round's result, e.g. to print progress.
            max_rounds: stop after training this many rounds.
            max_sleep_s: cap on the pause the aggregator asks for between check-ins.

        Returns:
            The number of rounds trained.
        """
        self._stop.clear()
        trained = 0
        while not self._stop.is_set():
            before = self._last_result
            action = self.step()
            if action is TaskAction.FINISHED:
                if not self._exhausted:
                    logger.info("federation %s finished", self.federation_id)
                break
            if action is TaskAction.TRAIN and self._last_result is before:
                continue  # a secure stage answered: check in again at once
            if action is TaskAction.TRAIN and self._last_result is not None:
                trained += 1
                if on_round is not None:
                    on_round(self._last_result)
                if max_rounds is not None and trained >= max_rounds:
                    break
            elif self._last_task is not None:
                self._stop.wait(min(self._last_task.retry_after_s, max_sleep_s))
        return trained

    def stop(self) -> None:
        """Make `run` return after the current step (safe from another thread)."""
        self._stop.set()

    def _secure_step(self, task: Task) -> TaskAction:
        """Answer one SecAgg+ stage; TRAIN if something was sent, else WAIT."""
        if self._secure is None:
            raise ConfigError(
                [
                    "this federation uses secure aggregation: create the Client with the "
                    "identity registered at enrollment (Client(..., identity=...))"
                ]
            )
        progress = self._secure.answer(task, lambda: self.train(task))
        if progress is Progress.TRAINED:
            meta = self._secure.last_meta or UpdateMeta(num_examples=0)
            self._last_result = RoundResult(
                round=task.round or 0,
                model_version=task.model_version or "",
                num_examples=meta.num_examples,
                metrics=dict(meta.metrics),
                receipt=None,
                secure=True,
            )
        sent = progress in (Progress.SENT, Progress.TRAINED)
        return TaskAction.TRAIN if sent else TaskAction.WAIT

    def train(self, task: Task) -> tuple[ParameterSet, UpdateMeta]:
        """Train on the model of a `train` task; return the delta and its metadata, unsent.

        `act` trains and uploads (or, in secure rounds, masks the delta); a
        simulation that submits later hands the result to `submit`.

        Raises:
            BudgetExhausted: DP-SGD only: the round would spend more than the budget.
        """
        number, version = _round_of(task)
        params = self._fetch_model(version)
        trained, meta = self.trainer.fit(params, task.train or TrainConfig(), round_number=number)
        return trained.subtract(params), meta

    def submit(self, task: Task, delta: ParameterSet, meta: UpdateMeta) -> RoundResult:
        """Upload the delta trained for `task` and record the round's result.

        `act` calls it after training here; a simulation whose clients train
        in worker processes (`clients.Fleet`) calls it with their results.
        A round that moved on while the client trained is logged, not raised.
        """
        number = _round_of(task)[0]
        transport = self.transport
        return self._submitted(
            task, meta, lambda: transport.submit_update(self.federation_id, number, delta, meta)
        )

    def submit_encoded(self, task: Task, data: bytes | memoryview, meta: UpdateMeta) -> RoundResult:
        """Like `submit`, for an update already in the wire format (`meta` is in its metadata).

        A transport that takes encoded updates (`fedcore.EncodedUpload`)
        gets the bytes as they are; another gets them decoded.
        """
        number = _round_of(task)[0]
        transport = self.transport
        if self._takes_encoded[0] is not transport:
            # A check against a runtime protocol costs microseconds: once per transport.
            self._takes_encoded = (transport, isinstance(transport, EncodedUpload))
        if self._takes_encoded[1]:
            encoded = cast(EncodedUpload, transport)
            return self._submitted(
                task, meta, lambda: encoded.submit_encoded(self.federation_id, number, data)
            )
        return self.submit(task, wire.decode(data)[0], meta)

    def _submitted(
        self, task: Task, meta: UpdateMeta, upload: Callable[[], Receipt]
    ) -> RoundResult:
        """Run `upload` for `task` and record the round's result."""
        number, version = _round_of(task)
        receipt: Receipt | None
        try:
            receipt = upload()
        except (RoundStateError, UpdateConflict) as exc:
            # A straggler: the round moved on while this client trained. The
            # next check-in brings the next round, so this is not fatal.
            logger.warning("round %d: update not taken: %s", number, exc)
            receipt = None
        else:
            logger.info("round %d: uploaded the update of %d examples", number, meta.num_examples)
        self._last_result = RoundResult(
            round=number,
            model_version=version,
            num_examples=meta.num_examples,
            metrics=dict(meta.metrics),
            receipt=receipt,
        )
        return self._last_result

    def _fetch_model(self, version: str) -> ParameterSet:
        if self._model is not None and self._model[0] == version:
            return self._model[1]
        params = self.transport.fetch_model(self.federation_id, version)
        self._model = (version, params)
        return params


def _round_of(task: Task) -> tuple[int, str]:
    if task.round is None or task.model_version is None:
        raise TransportError("the aggregator sent a train task without round or model version")
    return task.round, task.model_version
