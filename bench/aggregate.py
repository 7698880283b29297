"""Benchmark: streaming FedAvg over memory-mapped updates, against the memory-read floor.

For each model size P and number of updates K, a child process opens the
updates the way the aggregator does (safetensors files written with
`fedcore.wire.write`, opened with `fedcore.wire.read`, memory-mapped) and
measures, in the same process and on the same inputs in the same order:

- the floor: the time to read every input byte once on one thread. Several
  honest reads are timed (`np.maximum.reduce`, `ndarray.sum`,
  `np.bitwise_or.reduce` over a uint64 view) and the fastest is the floor;
- the threaded floor: the same reads split over as many threads as the fold
  uses, each thread reading its share of every tensor (what the fold's threads
  read), so that the fold can be compared with a read that uses the same cores;
- the fold with `WeightedMean.add_many` (16 updates per call, on all its
  threads), the same on one thread, with one `WeightedMean.add` per update,
  and `FedAvg.finish`. A fold is timed from `FedAvg.begin` to its last
  batch; `FedAvg.finish` follows it, as in a server's round, and is timed
  apart ("finish", after the fresh `add_many` fold). The folds run in two
  settings:
  - fresh: no free accumulator, as in the first round of a process; the fold
    page-faults and first writes a new float64 accumulator, whose cost alone
    is shown as "8P first touch". These are the columns without "reused", and
    one `add` per update is measured this way only;
  - reused: right after a fresh fold of the same configuration, whose
    `finish` gave its accumulator (8P bytes, written) back to `fedavg`'s pool:
    the steady state of a server that runs round after round with one model;
- the peak RSS growth above the inputs: the baseline is the RSS once every input
  page is mapped and resident, the peak is `ru_maxrss` after the fold; "kept"
  is the RSS growth once `finish` returned and the next model is dropped, which
  holds the accumulator kept for the next round (2 in units of 4P);
- the one-off cost of the compiled loop (`fedcore.kernels`, where numba is
  installed): the time and RSS growth of a first fold of one small update in
  the process, which imports numba and loads the loop. It is paid before the
  baseline above, as in a server that has folded a round before.

Writing K distinct files of P float32 would need K * P * 4 bytes of disk (16 GB
for K=400, P=1e7), so `--files` distinct updates (default 20) are written per P
and the K folds cycle through them. Timings are the best of `--repeat` runs,
taken in turns so that the floor and the folds see the same background load.

Run: .venv/bin/python bench/aggregate.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from fedcore import FedAvg, ParameterSet, WeightedMean, fedavg, kernels, wire

BATCH = 16
FULL = {"sizes": [1_000_000, 10_000_000], "counts": [10, 100, 400]}
QUICK = {"sizes": [1_000_000], "counts": [10, 100]}


def layout(size: int) -> dict[str, int]:
    """Split `size` parameters into tensors shaped like a small network's."""
    head, mid = size // 2, size // 4
    return {
        "body.weight": head,
        "head.weight": mid,
        "head.bias": 1000,
        "tail": size - head - mid - 1000,
    }


def write_updates(size: int, files: int, directory: Path) -> list[Path]:
    rng = np.random.default_rng(size)
    paths = []
    for i in range(files):
        update = {
            name: rng.standard_normal(n, dtype=np.float32) for name, n in layout(size).items()
        }
        path = directory / f"p{size}-u{i:02d}.safetensors"
        wire.write(update, path)
        paths.append(path)
    return paths


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def reader(
    updates: list[ParameterSet], count: int, read: Callable[[np.ndarray[Any, Any]], object]
) -> Callable[[], None]:
    """Return a run that reads the K inputs in the order the fold reads them."""

    def run() -> None:
        for k in range(count):
            for array in updates[k % len(updates)].values():
                read(array)

    return run


def threaded_reader(
    updates: list[ParameterSet],
    count: int,
    read: Callable[[np.ndarray[Any, Any]], object],
    pool: ThreadPoolExecutor,
    threads: int,
) -> Callable[[], None]:
    """Return a run where each of `threads` threads reads its share of every input."""

    def share(t: int) -> None:
        for k in range(count):
            for array in updates[k % len(updates)].values():
                # Shares of an even length, so that the uint64 view works.
                per = -(-array.size // threads // 2) * 2
                read(array[t * per : (t + 1) * per])

    def run() -> None:
        list(pool.map(share, range(threads)))

    return run


def or_u64(array: np.ndarray[Any, Any]) -> object:
    return np.bitwise_or.reduce(array[: array.size // 2 * 2].view(np.uint64))


READS: dict[str, Callable[[np.ndarray[Any, Any]], object]] = {
    "np.maximum.reduce": np.maximum.reduce,
    "ndarray.sum": np.sum,
    "np.bitwise_or.reduce(u64 view)": or_u64,
}


def fold_many(model: ParameterSet, updates: list[ParameterSet], count: int) -> WeightedMean:
    aggregate = FedAvg().begin(model)
    for first in range(0, count, BATCH):
        group = range(first, min(first + BATCH, count))
        aggregate.add_many((updates[k % len(updates)], float(1 + k % 7)) for k in group)
    return aggregate


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Make the aggregates created inside fold on the calling thread only."""
    saved = fedavg._MAX_LANES
    fedavg._MAX_LANES = 1
    try:
        yield
    finally:
        fedavg._MAX_LANES = saved


def fold_many_one_thread(
    model: ParameterSet, updates: list[ParameterSet], count: int
) -> WeightedMean:
    with one_thread():
        return fold_many(model, updates, count)


def fold_one(model: ParameterSet, updates: list[ParameterSet], count: int) -> WeightedMean:
    aggregate = FedAvg().begin(model)
    for k in range(count):
        aggregate.add(updates[k % len(updates)], float(1 + k % 7))
    return aggregate


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def open_inputs(paths: list[Path], count: int) -> tuple[list[ParameterSet], ParameterSet]:
    updates = [wire.read(p)[0] for p in paths[: min(count, len(paths))]]
    model = ParameterSet({n: np.full(a.shape, 0.5, a.dtype) for n, a in updates[0].items()})
    for update in updates:  # fault every input page in: the baseline holds the inputs
        for array in update.values():
            np.maximum.reduce(array)
    return updates, model


def measure_memory(model: ParameterSet, updates: list[ParameterSet], count: int) -> dict[str, int]:
    baseline = rss()
    aggregate = fold_many(model, updates, count)
    fold_peak = peak_rss() - baseline
    new = FedAvg().finish(model, aggregate)
    finish_peak = peak_rss() - baseline
    del new
    return {
        "baseline_rss_bytes": baseline,
        "fold_peak_bytes": fold_peak,
        "finish_peak_bytes": finish_peak,
        "kept_bytes": rss() - baseline,
    }


Fold = Callable[[ParameterSet, list[ParameterSet], int], WeightedMean]


def round_run(
    fold: Fold, model: ParameterSet, updates: list[ParameterSet], count: int, *, reused: bool
) -> Callable[[], dict[str, float]]:
    """Return a run that times one round's fold, fresh or reused, and its finish."""
    size = sum(a.size for a in model.values())

    def run() -> dict[str, float]:
        if reused:
            # Left there by the fresh round just before (the runs' order).
            assert fedavg._FREE.sizes() == [size], fedavg._FREE.sizes()
        else:
            fedavg._FREE.clear()
        start = time.perf_counter()
        aggregate = fold(model, updates, count)
        folded = time.perf_counter()
        FedAvg().finish(model, aggregate)
        return {"fold": folded - start, "finish": time.perf_counter() - folded}

    return run


def load_compiled() -> dict[str, Any]:
    """Fold one update just large enough for the compiled loop; return what that cost."""
    small = ParameterSet({"w": np.ones(fedavg._COMPILED_MIN, np.float32)})
    before, start = rss(), time.perf_counter()
    FedAvg().begin(small).add(small, 1.0)
    return {
        "compiled": kernels.load() is not None,
        "compiled_load_s": time.perf_counter() - start,
        "compiled_load_bytes": rss() - before,
    }


def child(size: int, count: int, paths: list[Path], repeat: int) -> dict[str, Any]:
    result: dict[str, Any] = {"P": size, "K": count} | load_compiled()
    updates, model = open_inputs(paths, count)
    result["distinct"] = len(updates)
    result |= measure_memory(model, updates, count)
    # The fold's thread count is its own choice (the CPUs it may use, capped).
    threads = fedavg._thread_count()
    result["threads"] = threads
    pool = ThreadPoolExecutor(max_workers=threads)

    def only(run: Callable[[], object]) -> Callable[[], dict[str, float]]:
        return lambda: {"": timed(run)}

    # Each "reused" run follows the fresh run of the same fold, whose finish
    # left the accumulator in the pool.
    runs: dict[str, Callable[[], dict[str, float]]] = {
        **{f"floor {name}": only(reader(updates, count, read)) for name, read in READS.items()},
        **{
            f"floorT {name}": only(threaded_reader(updates, count, read, pool, threads))
            for name, read in READS.items()
        },
        "add_many": round_run(fold_many, model, updates, count, reused=False),
        "add_many_reused": round_run(fold_many, model, updates, count, reused=True),
        "add_many_1t": round_run(fold_many_one_thread, model, updates, count, reused=False),
        "add_many_1t_reused": round_run(fold_many_one_thread, model, updates, count, reused=True),
        "add": round_run(fold_one, model, updates, count, reused=False),
        "touch": only(lambda: np.zeros(size).fill(1.0)),
    }
    # Interleaved, so that the floor and the folds see the same background load.
    best: dict[str, float] = {}
    for _ in range(repeat):
        for name, run in runs.items():
            for part, seconds in run().items():
                key = f"{name} {part}".strip()
                best[key] = min(best.get(key, float("inf")), seconds)
    pool.shutdown()
    for key, prefix in (("floor", "floor "), ("floorT", "floorT ")):
        floors = {name[len(prefix) :]: t for name, t in best.items() if name.startswith(prefix)}
        result[f"{key}_read"] = min(floors, key=lambda n: floors[n])
        result[f"{key}_s"] = floors[result[f"{key}_read"]]
        result[f"{key}s"] = floors
    folds = ("add_many", "add_many_reused", "add_many_1t", "add_many_1t_reused", "add")
    result |= {f"{name}_s": best[f"{name} fold"] for name in folds}
    # finish after a fresh fold of add_many: the same work after any fold.
    result |= {"finish_s": best["add_many finish"], "touch_s": best["touch"]}
    return result


def run_child(size: int, count: int, paths: list[Path], repeat: int) -> dict[str, Any]:
    args = [sys.executable, __file__, "--repeat", str(repeat), "--child", str(size), str(count)]
    out = subprocess.run([*args, *map(str, paths)], check=True, stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


COLUMNS = [
    "P",
    "K",
    "floor ms, 1 thread (fastest read)",
    "floor ms, T threads",
    "add_many ms (T threads)",
    "/ floor",
    "/ floor T",
    "add_many ms, reused (T threads)",
    "/ floor",
    "/ floor T",
    "add_many ms, 1 thread",
    "/ floor",
    "add_many ms, 1 thread, reused",
    "/ floor",
    "add ms",
    "/ floor",
    "finish ms",
    "8P first touch ms",
    "fold peak MB",
    "fold peak / 4P",
    "with finish / 4P",
    "kept / 4P",
]


def short(read: str) -> str:
    return read.split("(")[0].removeprefix("np.")


def table_row(r: dict[str, Any]) -> list[str]:
    floor, floor_t, model_bytes = r["floor_s"], r["floorT_s"], 4 * r["P"]
    return [
        f"{r['P']:.0e}",
        str(r["K"]),
        f"{floor * 1e3:.1f} ({short(r['floor_read'])})",
        f"{floor_t * 1e3:.1f} (T={r['threads']})",
        f"{r['add_many_s'] * 1e3:.1f}",
        f"**{r['add_many_s'] / floor:.2f}x**",
        f"{r['add_many_s'] / floor_t:.2f}x",
        f"{r['add_many_reused_s'] * 1e3:.1f}",
        f"**{r['add_many_reused_s'] / floor:.2f}x**",
        f"{r['add_many_reused_s'] / floor_t:.2f}x",
        f"{r['add_many_1t_s'] * 1e3:.1f}",
        f"{r['add_many_1t_s'] / floor:.2f}x",
        f"{r['add_many_1t_reused_s'] * 1e3:.1f}",
        f"{r['add_many_1t_reused_s'] / floor:.2f}x",
        f"{r['add_s'] * 1e3:.1f}",
        f"{r['add_s'] / floor:.2f}x",
        f"{r['finish_s'] * 1e3:.1f}",
        f"{r['touch_s'] * 1e3:.1f}",
        f"{r['fold_peak_bytes'] / 2**20:.1f}",
        f"{r['fold_peak_bytes'] / model_bytes:.2f}",
        f"{r['finish_peak_bytes'] / model_bytes:.2f}",
        f"{r['kept_bytes'] / model_bytes:.2f}",
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(table_row(r)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="P=1e6 and K in {10, 100} only")
    parser.add_argument("--files", type=int, default=20, help="distinct update files per P")
    parser.add_argument("--repeat", type=int, default=5, help="timings are the best of this many")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, count, *paths = args.child
        print(json.dumps(child(int(size), int(count), [Path(p) for p in paths], args.repeat)))
        return
    grid = QUICK if args.quick else FULL
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedcore-bench-") as tmp:
        for size in grid["sizes"]:
            paths = write_updates(size, args.files, Path(tmp))
            for count in grid["counts"]:
                rows.append(run_child(size, count, paths, args.repeat))
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"{args.files} distinct float32 update files per P, cycled for K folds;", end=" ")
    print(f"timings are the best of {args.repeat}.")
    print("/ floor = time / fastest one-thread read of the inputs (target for add_many <= 1.5x);")
    print("/ floor T = time / fastest read of the inputs split over the fold's T threads.")
    print("fresh: a new accumulator (first round of a process); reused: the accumulator the")
    print("previous round's finish gave back (a server's steady state).")
    print("peak / 4P: peak RSS growth over the resident inputs in units of the float32 model")
    print("size (target <= 3, flat in K); kept / 4P: RSS growth between rounds (accumulator kept).")
    if rows[0]["compiled"]:
        load_s = max(r["compiled_load_s"] for r in rows)
        load_mb = max(r["compiled_load_bytes"] for r in rows) / 2**20
        print("Compiled loop: numba loaded once per process before the baseline, in at most")
        print(f"{load_s:.2f} s and {load_mb:.0f} MB of RSS.")
    else:
        print("numba is not installed: numpy folds everything.")
    print_table(rows)


if __name__ == "__main__":
    main()
