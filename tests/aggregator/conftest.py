"""Fixtures for the store tests: one database URL or store per backend.

The PostgreSQL variants run only when FEDCORE_TEST_DATABASE_URL names a
database; each test then gets a schema of its own (via libpq's `options`
search_path), dropped afterwards, so tests neither see nor leave state.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator

import pytest

from aggregator import MemoryStore, SqlStore


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> Iterator[MemoryStore | SqlStore]:
    opened: MemoryStore | SqlStore
    if request.param == "memory":
        opened = MemoryStore()
    else:
        opened = SqlStore.open(request.getfixturevalue(f"{request.param}_url"))
    yield opened
    opened.close()


RunTogether = Callable[[list[str]], list[int]]


@pytest.fixture
def run_together() -> RunTogether:
    """Return a runner of two copies of a command that start their work at once.

    Each copy prints "ready" once set up and then waits for a line on stdin,
    so that both are released together; the runner returns the exit codes.
    """

    def run(argv: list[str]) -> list[int]:
        with contextlib.ExitStack() as stack:
            workers = []
            for _ in range(2):
                pipe = subprocess.PIPE
                worker = stack.enter_context(
                    subprocess.Popen(argv, stdin=pipe, stdout=pipe, text=True)
                )
                stack.callback(worker.kill)  # no-op unless the test failed midway
                workers.append(worker)
            for worker in workers:
                assert worker.stdout is not None
                assert worker.stdout.readline() == "ready\n"
            for worker in workers:
                assert worker.stdin is not None
                worker.stdin.write("go\n")
                worker.stdin.close()
            return [worker.wait(timeout=60) for worker in workers]

    return run
