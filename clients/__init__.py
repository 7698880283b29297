"""clients: everything that trains.

The edge SDK (`Client`, the client loop, over `HttpTransport` with retries),
the `Trainer` protocol and `TorchTrainer` (CPU or CUDA), conversion between
torch state dicts and parameter sets, the virtual `Fleet` for simulation, and
the reference digits task (`clients.digits`, which needs scikit-learn only
when its data is loaded). May import fedcore and privacy; never the
aggregator, the api, or the server stack (FastAPI, SQLAlchemy, psycopg), so
that an edge device installs it with the base install and torch. The HTTP
half (httpx) loads on first use, so that a simulation does not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clients import digits
from clients.client import Client, RoundResult
from clients.fleet import Fleet
from clients.torchstate import copy_into, to_parameters, to_state_dict
from clients.trainer import Device, TensorData, TorchTrainer, Trainer, resolve_device

__all__ = [
    "Client",
    "Device",
    "Fleet",
    "HttpTransport",
    "RetryPolicy",
    "RoundResult",
    "TensorData",
    "TorchTrainer",
    "Trainer",
    "copy_into",
    "digits",
    "enroll",
    "enroll_identity",
    "resolve_device",
    "to_parameters",
    "to_state_dict",
]

if TYPE_CHECKING:
    from clients.http import HttpTransport, RetryPolicy, enroll, enroll_identity

_LAZY = {"HttpTransport", "RetryPolicy", "enroll", "enroll_identity"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("clients.http"), name)
    raise AttributeError(f"module 'clients' has no attribute {name!r}")
