"""Run one federated client until its federation finishes.

    python -m clients --server URL --token T --federation FID
        [--data digits --shard-file PATH --shard I] [--device auto|cpu|cuda] [--seed N]
    python -m clients --server URL --enrollment-token E ...

Needs only the base install and torch (scikit-learn for `--data digits`).
Prints one line per round trained. Tokens may come from the environment
(`FEDCORE_TOKEN`, `FEDCORE_ENROLLMENT_TOKEN`) to keep them out of the
process list; they are never printed or logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import torch

from clients import digits
from clients.client import Client, RoundResult
from clients.http import HttpTransport, enroll_identity
from clients.trainer import TensorData, TorchTrainer
from fedcore import FedcoreError
from privacy.secagg import ClientIdentity

__all__ = ["main"]

logger = logging.getLogger("clients")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the client and return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        token, federation_id, identity = _credentials(args)
        trainer = TorchTrainer(
            digits.make_mlp(args.seed), _data(args), device=args.device, seed=args.seed
        )
        with HttpTransport(args.server, token, wait_s=args.wait) as transport:
            client = Client(transport, trainer, federation_id, identity=identity)
            client.run(on_round=_report)
    except (FedcoreError, ValueError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clients", description="Run a fedcore client until its federation ends."
    )
    parser.add_argument("--server", required=True, help="aggregator base URL")
    parser.add_argument("--token", default=os.environ.get("FEDCORE_TOKEN"), help="client token")
    parser.add_argument("--federation", help="federation id (given by enrollment otherwise)")
    parser.add_argument(
        "--enrollment-token",
        default=os.environ.get("FEDCORE_ENROLLMENT_TOKEN"),
        help="enroll with this one-time token instead of --token/--federation",
    )
    parser.add_argument("--data", choices=["digits"], default="digits", help="local data set")
    parser.add_argument("--shard-file", help="partition JSON file; all training data if omitted")
    parser.add_argument("--shard", type=int, default=0, help="this client's part of --shard-file")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0, help="shuffling seed (>= 0)")
    parser.add_argument("--wait", type=float, default=20.0, help="long-poll seconds, 0 to 30")
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default="WARNING"
    )
    return parser


def _credentials(args: argparse.Namespace) -> tuple[str, str, ClientIdentity | None]:
    """Return the client token, the federation id, and the identity if enrolled here.

    Enrolling registers a fresh identity key, which secure aggregation needs;
    like the credential, it lives only in this process.
    """
    if args.enrollment_token:
        enrollment, identity = enroll_identity(args.server, args.enrollment_token)
        logger.warning(
            "enrolled as client %s of federation %s; the credential lives only in this process",
            enrollment.client_id,
            enrollment.federation_id,
        )
        return enrollment.token, enrollment.federation_id, identity
    if not args.token or not args.federation:
        raise ValueError("pass --token and --federation, or --enrollment-token")
    return str(args.token), str(args.federation), None


def _data(args: argparse.Namespace) -> TensorData:
    split = digits.load_digits_split()
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    if args.shard_file is None:
        return x, y
    parts = digits.load_partition(args.shard_file)
    if not 0 <= args.shard < len(parts):
        raise ValueError(f"--shard {args.shard} is not within 0 and {len(parts) - 1}")
    return digits.client_data(split, [parts[args.shard]])[0]


def _report(result: RoundResult) -> None:
    loss = result.metrics.get("train_loss", float("nan"))
    status = "accepted" if result.receipt is not None else "too late, not taken"
    if result.secure:
        status = "sent masked (secure aggregation)"
    sys.stdout.write(
        f"round {result.round}: trained on {result.num_examples} examples, "
        f"train_loss {loss:.4f}, {status}\n"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
