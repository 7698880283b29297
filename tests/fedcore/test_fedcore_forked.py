"""`fedcore.forked`: forked workers with a pipe each, closed cleanly."""

from __future__ import annotations

import os
from multiprocessing.connection import Connection

import pytest

from fedcore.forked import ForkedWorkers, fork_available

pytestmark = pytest.mark.skipif(not fork_available(), reason="needs the 'fork' start method")


def _echo(conn: Connection, prefix: bytes) -> None:
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:
            return
        if message == b"exit":
            os._exit(7)
        conn.send_bytes(prefix + message + b"@" + str(os.getpid()).encode())


def test_each_worker_answers_on_its_own_pipe_and_close_ends_them() -> None:
    workers = ForkedWorkers(3, _echo, lambda i: (f"w{i}:".encode(),), name="echo")
    for conn in workers.conns:
        conn.send_bytes(b"ping")
    answers = [workers.receive(i, "echo worker") for i in range(3)]
    assert [a.split(b"@")[0] for a in answers] == [b"w0:ping", b"w1:ping", b"w2:ping"]
    pids = {int(a.split(b"@")[1]) for a in answers}
    assert len(pids) == 3
    assert os.getpid() not in pids
    processes = list(workers.procs)
    workers.close()
    # Every worker saw end of file (the parent's ends of all pipes closed in
    # each child too) and returned.
    assert [p.exitcode for p in processes] == [0, 0, 0]
    workers.close()


def test_a_worker_that_died_is_reported_with_its_exit_code() -> None:
    with ForkedWorkers(2, _echo, lambda i: (b"",), name="echo") as workers:
        workers.conns[1].send_bytes(b"exit")
        with pytest.raises(RuntimeError, match=r"echo worker 1 died \(exit code 7\)"):
            workers.receive(1, "echo worker")


def test_a_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ForkedWorkers(0, _echo, lambda i: (b"",), name="echo")
