"""fedcore: the shared core of the framework.

Parameter sets and their safetensors wire format, the aggregation math
(strategies), configuration models, the messages that clients and the
aggregator exchange, the `Transport` and `Strategy` protocols, and the error
hierarchy. Imports nothing of ours, and never torch, SQLAlchemy or FastAPI.
"""

from fedcore import wire
from fedcore.config import FederationConfig, StrategyName, parse_config
from fedcore.errors import (
    AuthError,
    BudgetExhausted,
    ConfigError,
    FedcoreError,
    FederationStateError,
    Forbidden,
    NonFiniteUpdate,
    NotFound,
    PayloadTooLarge,
    RoundStateError,
    TensorMismatch,
    TransportError,
    UpdateConflict,
    UpdateRejected,
    WireFormatError,
)
from fedcore.fedavg import FedAvg, WeightedMean
from fedcore.messages import (
    UPDATE_META_KEY,
    DistributedNoise,
    DpSgdSettings,
    Enrollment,
    Receipt,
    SecAggSetup,
    Task,
    TaskAction,
    TrainConfig,
    UpdateMeta,
)
from fedcore.parameters import Array, ParameterSet, TensorSpec, as_dtype
from fedcore.strategy import Aggregate, Strategy
from fedcore.transport import EncodedUpload, Transport

__all__ = [
    "UPDATE_META_KEY",
    "Aggregate",
    "Array",
    "AuthError",
    "BudgetExhausted",
    "ConfigError",
    "DistributedNoise",
    "DpSgdSettings",
    "EncodedUpload",
    "Enrollment",
    "FedAvg",
    "FedcoreError",
    "FederationConfig",
    "FederationStateError",
    "Forbidden",
    "NonFiniteUpdate",
    "NotFound",
    "ParameterSet",
    "PayloadTooLarge",
    "Receipt",
    "RoundStateError",
    "SecAggSetup",
    "Strategy",
    "StrategyName",
    "Task",
    "TaskAction",
    "TensorMismatch",
    "TensorSpec",
    "TrainConfig",
    "Transport",
    "TransportError",
    "UpdateConflict",
    "UpdateMeta",
    "UpdateRejected",
    "WeightedMean",
    "WireFormatError",
    "as_dtype",
    "parse_config",
    "wire",
]
