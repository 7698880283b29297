"""`fedcore.forked`: forked workers with a pipe each, closed cleanly; their messages."""

from __future__ import annotations

import gc
import os
from multiprocessing.connection import Connection

import pytest

from fedcore.forked import ForkedWorkers, fork_available, pack, unpack

pytestmark = pytest.mark.skipif(not fork_available(), reason="needs the 'fork' start method")


def _echo(conn: Connection, prefix: bytes) -> None:
    while True:
        try:
            header, parts = unpack(conn.recv_bytes())
        except EOFError:
            return
        if header.get("exit"):
            os._exit(7)
        conn.send_bytes(pack({"pid": os.getpid()}, [prefix + bytes(p) for p in parts]))


def test_each_worker_answers_on_its_own_pipe_and_close_ends_them() -> None:
    workers = ForkedWorkers(3, _echo, lambda i: (f"w{i}:".encode(),), name="echo")
    for index in range(3):
        workers.send(index, {}, [b"ping", b""])
    answers = [workers.receive(i, "echo worker") for i in range(3)]
    assert [[bytes(p) for p in parts] for _, parts in answers] == [
        [b"w0:ping", b"w0:"],
        [b"w1:ping", b"w1:"],
        [b"w2:ping", b"w2:"],
    ]
    pids = {header["pid"] for header, _ in answers}
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
        workers.send(1, {"exit": True})
        with pytest.raises(RuntimeError, match=r"echo worker 1 died \(exit code 7\)"):
            workers.receive(1, "echo worker")


# An object of the parent's, made before the workers fork.
_INHERITED = [object() for _ in range(3)]


def _collector_view(conn: Connection) -> None:
    conn.recv_bytes()
    visible = any(o is _INHERITED for o in gc.get_objects())
    conn.send_bytes(pack({"frozen": gc.get_freeze_count(), "visible": visible}))


def test_workers_collectors_skip_what_they_inherited_and_the_parent_is_left_as_it_was() -> None:
    assert gc.get_freeze_count() == 0
    with ForkedWorkers(2, _collector_view, lambda i: (), name="gc") as workers:
        assert gc.get_freeze_count() == 0
        assert any(o is _INHERITED for o in gc.get_objects())
        for index in range(2):
            workers.send(index, {})
            header, _ = workers.receive(index, "gc worker")
            # Frozen in the worker: its collections never walk (and so never
            # copy the pages of) the parent's objects.
            assert header["frozen"] > 0
            assert header["visible"] is False


def test_objects_the_caller_froze_stay_frozen() -> None:
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with ForkedWorkers(1, _collector_view, lambda i: (), name="gc"):
            pass
        assert gc.get_freeze_count() >= before
    finally:
        gc.unfreeze()


def test_a_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ForkedWorkers(0, _echo, lambda i: (b"",), name="echo")


def test_a_message_carries_its_header_and_parts_unchanged() -> None:
    parts = [b"", b"\x00\xff" * 1000, memoryview(b"view")]
    header, unpacked = unpack(pack({"op": "x", "n": [1, 2]}, parts))
    assert header == {"op": "x", "n": [1, 2]}
    assert [bytes(p) for p in unpacked] == [b"", b"\x00\xff" * 1000, b"view"]
    assert unpack(pack({})) == ({}, [])
