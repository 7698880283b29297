"""aggregator: the service core, without HTTP.

Federations, rounds and their stages, client selection, persistence
(SQLAlchemy stores, a content-addressed blob store), streaming aggregation,
central differential privacy (Poisson cohorts, the privacy budget, noisy
rounds), recovery after a restart, and an in-process transport for
simulation. May import fedcore and privacy; never api.
"""

from typing import TYPE_CHECKING, Any

from aggregator.access import Access, check_client_token
from aggregator.blobs import BlobStore, FileBlobStore, MemoryBlobStore, StagedBlob
from aggregator.config import FederationSettings, SecAggSettings, parse_settings
from aggregator.inprocess import InProcessTransport
from aggregator.memstore import MemoryStore
from aggregator.privacy import PrivacyReport, RoundEpsilon
from aggregator.records import (
    AdminTokenRecord,
    ClientRecord,
    EnrollmentTokenRecord,
    FederationRecord,
    FederationStatus,
    ModelRecord,
    RoundPrivacy,
    RoundRecord,
    RoundStatus,
    SecAggEntry,
    SecAggMessageRecord,
    UpdateRecord,
)
from aggregator.service import Aggregator, Submission
from aggregator.store import Store, Transaction
from aggregator.tokens import TokenKind

if TYPE_CHECKING:
    from aggregator.sqlstore import SqlStore

__all__ = [
    "Access",
    "AdminTokenRecord",
    "Aggregator",
    "BlobStore",
    "ClientRecord",
    "EnrollmentTokenRecord",
    "FederationRecord",
    "FederationSettings",
    "FederationStatus",
    "FileBlobStore",
    "InProcessTransport",
    "MemoryBlobStore",
    "MemoryStore",
    "ModelRecord",
    "PrivacyReport",
    "RoundEpsilon",
    "RoundPrivacy",
    "RoundRecord",
    "RoundStatus",
    "SecAggEntry",
    "SecAggMessageRecord",
    "SecAggSettings",
    "SqlStore",
    "StagedBlob",
    "Store",
    "Submission",
    "TokenKind",
    "Transaction",
    "UpdateRecord",
    "check_client_token",
    "parse_settings",
]


def __getattr__(name: str) -> Any:
    # Loaded on first use: SQLAlchemy is slow to import, and simulation and
    # the in-process transport never need it.
    if name == "SqlStore":
        from aggregator.sqlstore import SqlStore

        return SqlStore
    raise AttributeError(f"module 'aggregator' has no attribute {name!r}")
