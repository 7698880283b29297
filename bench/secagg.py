"""Benchmark: SecAgg+ mask expansion, Shamir combine, and whole in-process rounds.

Three parts, printed as tables:

1. Mask expansion: a 256-bit seed to P elements of Z_(2^b) with the AES-256-CTR
   keystream, alone (`expand_mask`) and added into a vector as a client does
   (`apply_masks`, 16 masks), single-threaded: figures are per core.
2. Shamir combine for n = 101 holders and threshold t = 50 (a 32-byte secret
   as 16 limbs over GF(65537)): cold (Lagrange coefficients computed) and warm
   (cached for the holder set, as for every further secret of a round).
3. Whole rounds (`privacy.secagg.simulate_round`: every client and
   the server in this process, every message through its byte encoding) for
   N clients and P = 1e5 parameters, no training. The baseline, in the same
   run, is the plain float sum of the same N vectors. Dropouts happen after
   share-keys and before masked-input (the costly case: the server rebuilds
   the dropped clients' mask keys and removes their pairwise masks). Client
   and server CPU time (time.thread_time of the threads that ran them) are
   reported separately; the critical path adds, per stage, the slowest client
   and the server, i.e. the round's compute latency when the clients run on
   their own devices. Each row runs once per `--workers` value: 1 runs the
   whole round on one thread, more run the clients of each stage on a pool of
   that many threads (`simulate_round(workers=...)`); then once per
   `--processes` value above 1, with the clients in that many forked worker
   processes (`simulate_round(processes=...)`; the server stays in this
   process), in the same run. Client CPU time is then measured in the
   workers.

Graph parameters come from `choose_parameters` (Bell et al.'s bound) for the
threat model of the row: corrupt fraction `--corrupt` (default 0.05), and
design dropout fraction 0.1 for the rows with 0% and 10% dropouts, 0.3 for
the rows with 30%.

Run: .venv/bin/python bench/secagg.py [--quick] [--clients N ...]
     [--dropouts F ...] [--corrupt GAMMA] [--workers W ...] [--processes P ...]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

from privacy.secagg import (
    ClientIdentity,
    Dropouts,
    Quantization,
    SecAggConfig,
    SimulatedClient,
    ThreatModel,
    expand_mask,
    plan_round,
    simulate_round,
)
from privacy.secagg.prg import Mask, apply_masks
from privacy.secagg.shamir import combine, split

PARAMETERS = 100_000
RING_BITS = 24


def best(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_masks(length: int, repeat: int) -> None:
    seed = os.urandom(32)
    masks = [Mask(os.urandom(32), 1 if i % 2 else -1) for i in range(16)]
    vector = np.zeros(length, dtype=np.uint32)
    expand = best(lambda: expand_mask(seed, length, RING_BITS), repeat)
    apply = best(lambda: apply_masks(vector, masks, ring_bits=RING_BITS), repeat) / len(masks)
    print(f"\n## mask expansion (P = {length:.0e}, ring 2^{RING_BITS}, uint32, one core)\n")
    print("| operation | ms per mask | MB/s | M elements/s |")
    print("|---|---|---|---|")
    for name, seconds in (
        ("expand_mask (new vector)", expand),
        ("apply_masks (add in place)", apply),
    ):
        print(
            f"| {name} | {seconds * 1e3:.2f} | {4 * length / seconds / 1e6:.0f} "
            f"| {length / seconds / 1e6:.0f} |"
        )


def bench_shamir(repeat: int) -> None:
    holders = list(range(1, 102))
    shares = split(os.urandom(32), holders=holders, threshold=50, entropy=os.urandom)
    rng = np.random.default_rng(0)
    picks = [sorted(rng.choice(101, size=50, replace=False)) for _ in range(repeat)]
    cold = []
    for pick in picks:  # distinct holder sets: nothing cached yet
        start = time.perf_counter()
        combine([holders[i] for i in pick], shares[pick], threshold=50)
        cold.append(time.perf_counter() - start)
    pick = picks[0]
    xs = [holders[i] for i in pick]
    warm = best(lambda: combine(xs, shares[pick], threshold=50), repeat)
    deal = best(
        lambda: split(os.urandom(32), holders=holders, threshold=50, entropy=os.urandom), repeat
    )
    print("\n## Shamir, n = 101, t = 50, 32-byte secret\n")
    print("| operation | ms | target |")
    print("|---|---|---|")
    print(f"| combine, cold (Lagrange coefficients computed) | {min(cold) * 1e3:.3f} | <= 20 |")
    print(f"| combine, warm (coefficients cached for the holder set) | {warm * 1e3:.3f} | |")
    print(f"| split (deal 101 shares) | {deal * 1e3:.3f} | |")


def fleet(count: int, length: int) -> tuple[list[str], dict[str, ClientIdentity], list[np.ndarray]]:
    ids = [f"client-{i:04d}" for i in range(count)]
    identities = {c: ClientIdentity.generate(c) for c in ids}
    rng = np.random.default_rng(count)
    updates = [rng.normal(0, 0.05, length).astype(np.float32) for _ in ids]
    return ids, identities, updates


def bench_round(
    count: int, dropout: float, repeat: int, corrupt: float, *, workers: int = 1, processes: int = 1
) -> dict[str, float]:
    ids, identities, updates = fleet(count, PARAMETERS)
    design = 0.3 if dropout > 0.1 else 0.1
    config = SecAggConfig(
        PARAMETERS,
        Quantization(clip=0.5, value_bits=16, max_weight=1.0),
        ThreatModel(corrupt_fraction=corrupt, dropout_fraction=design),
    )
    setup = plan_round(config, federation_id="bench", round=1, cohort=ids)
    vanished = frozenset(ids[: round(dropout * count)])

    def plain() -> np.ndarray:
        total = np.zeros(PARAMETERS, dtype=np.float64)
        for update in updates:
            total += update
        return total

    baseline = best(plain, 3)
    figures: dict[str, float] = {}
    for _ in range(repeat):
        clients = [
            SimulatedClient(identities[c], u, 1.0, rng=np.random.default_rng(i))
            for i, (c, u) in enumerate(zip(ids, updates, strict=True))
        ]
        start = time.perf_counter()
        report = simulate_round(
            setup,
            clients,
            dropouts=Dropouts(masked_input=vanished),
            workers=workers,
            processes=processes,
        )
        wall = time.perf_counter() - start
        assert report.result is not None, report.failure
        if not figures or wall < figures["wall"]:
            figures = {
                "wall": wall,
                "client": report.client_seconds,
                "server": report.server_seconds,
                "critical": report.critical_path_seconds,
            }
    figures |= {"plain": baseline, "degree": setup.degree, "threshold": setup.threshold}
    return figures


def bench_rounds(
    counts: list[int], dropouts: list[float], corrupt: float, pools: list[tuple[int, int]]
) -> None:
    print(
        f"\n## whole rounds, P = {PARAMETERS:.0e}, dropouts after share-keys, "
        f"corrupt fraction {corrupt}, {os.cpu_count()} CPUs\n"
    )
    print(
        "| N | dropout | k | t | clients on | plain sum ms | secagg wall s | / plain "
        "| client CPU s | client CPU per client ms | server CPU s | critical path s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for count in counts:
        for dropout in dropouts:
            for threads, processes in pools:
                f = bench_round(
                    count,
                    dropout,
                    repeat=3 if count <= 100 else 1,
                    corrupt=corrupt,
                    workers=threads,
                    processes=processes,
                )
                on = (
                    f"{processes} processes"
                    if processes > 1
                    else f"{threads} thread{'s' if threads > 1 else ''}"
                )
                print(
                    f"| {count} | {dropout:.0%} | {f['degree']:.0f} | {f['threshold']:.0f} "
                    f"| {on} | {f['plain'] * 1e3:.2f} | {f['wall']:.2f} "
                    f"| {f['wall'] / f['plain']:.0f}x | {f['client']:.2f} "
                    f"| {f['client'] / count * 1e3:.1f} | {f['server']:.2f} "
                    f"| {f['critical']:.2f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N <= 100 and a shorter mask run")
    parser.add_argument("--clients", type=int, nargs="*", help="only these N (rounds only)")
    parser.add_argument("--dropouts", type=float, nargs="*", default=[0.0, 0.1, 0.3])
    parser.add_argument("--corrupt", type=float, default=0.05, help="gamma of the threat model")
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[1], help="client threads per round"
    )
    parser.add_argument(
        "--processes",
        type=int,
        nargs="*",
        default=[os.cpu_count() or 1],
        help="client processes per round (rows for values above 1; default: one per CPU)",
    )
    args = parser.parse_args()
    pools = [(w, 1) for w in args.workers] + [(1, p) for p in args.processes if p > 1]
    if not args.clients:
        bench_masks(10_000_000 if not args.quick else 1_000_000, repeat=5)
        bench_shamir(repeat=20)
    counts = args.clients or ([10, 50, 100] if args.quick else [10, 50, 100, 500])
    bench_rounds(counts, args.dropouts, args.corrupt, pools)


if __name__ == "__main__":
    main()
