"""Blobs left behind by a crash between their fsync and their row's commit are collected."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from aggregator import Aggregator, FileBlobStore, MemoryStore, SqlStore, parse_settings
from fedcore import UPDATE_META_KEY, ParameterSet, UpdateMeta, wire


def model() -> ParameterSet:
    return ParameterSet({"w": np.zeros(4, np.float32)})


def age(blobs: FileBlobStore, digest: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(blobs.path(digest), (then, then))


def test_old_unreferenced_blobs_go_and_every_referenced_or_young_one_stays(
    store: MemoryStore | SqlStore, tmp_path: Path
) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    agg = Aggregator(store, blobs)
    data = wire.encode(model())
    staged = blobs.stage(len(data))
    staged.write(data)
    fid = agg.create_federation(
        parse_settings({"name": "o", "rounds": 2, "clients_per_round": 1}), staged
    ).id
    tokens, _ = agg.access.create_enrollment_tokens(fid, 1, 60)
    client = agg.access.enroll(tokens[0]).client_id
    agg.start(fid)
    agg.next_task(client, fid)
    meta = {UPDATE_META_KEY: UpdateMeta(num_examples=1).model_dump_json()}
    update = wire.encode(ParameterSet({"w": np.ones(4, np.float32)}), meta)
    staged = blobs.stage(len(update))
    staged.write(update)
    agg.submit_update(client, fid, 1, staged)
    referenced = set(blobs.digests())  # the initial model, the update, round 1's model
    assert len(referenced) == 3
    # What a crash after the blob's fsync and before its row's commit leaves.
    orphan = blobs.put(wire.encode(ParameterSet({"w": np.full(4, 2, np.float32)})))
    in_flight = blobs.put(wire.encode(ParameterSet({"w": np.full(4, 3, np.float32)})))
    for digest in [*referenced, orphan]:
        age(blobs, digest, 7200)

    assert agg.collect_orphans(grace_s=3600) == [orphan]
    assert set(blobs.digests()) == referenced | {in_flight}  # young: maybe an upload in flight
    assert agg.collect_orphans(grace_s=3600) == []
    # The federation goes on with every blob its rows name.
    assert agg.load_model(fid, agg.get_federation(fid).model_version)["w"].tolist() == [1.0] * 4
