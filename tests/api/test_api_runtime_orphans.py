"""The service's ticker collects orphan blobs once, off the start-up path."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from aggregator import Aggregator, FileBlobStore, MemoryStore
from api.runtime import Ticker
from fedcore import ParameterSet, wire


def test_the_ticker_deletes_an_old_orphan_before_ticking(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path)
    orphan = blobs.put(wire.encode(ParameterSet({"w": np.ones(3, np.float32)})))
    young = blobs.put(wire.encode(ParameterSet({"w": np.zeros(3, np.float32)})))
    then = time.time() - 7200
    os.utime(blobs.path(orphan), (then, then))
    ticker = Ticker(Aggregator(MemoryStore(), blobs), interval_s=0.01)
    ticker.start()
    try:
        deadline = time.monotonic() + 10
        while blobs.exists(orphan) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        ticker.stop()
    assert blobs.digests() == [young]
