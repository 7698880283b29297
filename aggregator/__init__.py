"""aggregator: the service core, without HTTP.

Federations, rounds and their stages, client selection, persistence
(SQLAlchemy stores, a content-addressed blob store), streaming aggregation,
recovery after a restart, and an in-process transport for simulation. May
import fedcore and privacy; never api.
"""

from aggregator.access import Access
from aggregator.blobs import BlobStore, FileBlobStore, MemoryBlobStore, StagedBlob
from aggregator.inprocess import InProcessTransport
from aggregator.memstore import MemoryStore
from aggregator.records import (
    AdminTokenRecord,
    ClientRecord,
    EnrollmentTokenRecord,
    FederationRecord,
    FederationStatus,
    ModelRecord,
    RoundRecord,
    RoundStatus,
    UpdateRecord,
)
from aggregator.service import Aggregator
from aggregator.sqlstore import SqlStore
from aggregator.store import Store, Transaction
from aggregator.tokens import TokenKind

__all__ = [
    "Access",
    "AdminTokenRecord",
    "Aggregator",
    "BlobStore",
    "ClientRecord",
    "EnrollmentTokenRecord",
    "FederationRecord",
    "FederationStatus",
    "FileBlobStore",
    "InProcessTransport",
    "MemoryBlobStore",
    "MemoryStore",
    "ModelRecord",
    "RoundRecord",
    "RoundStatus",
    "SqlStore",
    "StagedBlob",
    "Store",
    "TokenKind",
    "Transaction",
    "UpdateRecord",
]
