"""The error hierarchy shared by every fedcore package.

Every error that fedcore raises on purpose derives from `FedcoreError`; misuse
of an API additionally derives from `ValueError` or `TypeError` so that callers
who do not know fedcore can still catch it. The HTTP layer maps each class to
one status code and one problem type in a single table.

::

    FedcoreError
    ├── ConfigError (ValueError)            invalid federation or run configuration
    ├── WireFormatError (ValueError)        bytes that are not a valid safetensors payload
    ├── UpdateRejected (ValueError)         a well-formed update that does not fit the round
    │   ├── TensorMismatch                  names, shapes or dtypes differ from the model
    │   ├── NonFiniteUpdate                 NaN or Inf values
    │   ├── PayloadTooLarge                 body over the size limit
    │   └── UpdateConflict                  a different update already stored for this round
    ├── RoundStateError                     the round is closed, failed or not open yet
    ├── FederationStateError                the federation cannot do that in its state
    ├── NotFound (LookupError)              unknown federation, round, client or model id
    ├── AuthError                           missing, malformed, revoked or expired credential
    │   └── Forbidden                       valid credential, wrong role or wrong federation
    ├── TransportError                      the server could not be reached or answered badly
    └── BudgetExhausted                     a client's privacy budget cannot pay for another round
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BudgetExhausted",
    "ConfigError",
    "FedcoreError",
    "FederationStateError",
    "Forbidden",
    "NonFiniteUpdate",
    "NotFound",
    "PayloadTooLarge",
    "RoundStateError",
    "TensorMismatch",
    "TransportError",
    "UpdateConflict",
    "UpdateRejected",
    "WireFormatError",
]


class FedcoreError(Exception):
    """Base class of every error fedcore raises on purpose."""


class ConfigError(FedcoreError, ValueError):
    """A configuration is invalid; `problems` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration: " + "; ".join(self.problems))


class WireFormatError(FedcoreError, ValueError):
    """Bytes are not a valid safetensors payload (malformed or truncated)."""


class UpdateRejected(FedcoreError, ValueError):
    """A well-formed update does not fit the round it was sent to."""


class TensorMismatch(UpdateRejected):
    """Tensor names, shapes or dtypes differ from the round's model."""


class NonFiniteUpdate(UpdateRejected):
    """An update holds NaN or Inf values."""


class PayloadTooLarge(UpdateRejected):
    """A request body is larger than the configured limit."""


class UpdateConflict(UpdateRejected):
    """A different update from the same client is already stored for the round."""


class RoundStateError(FedcoreError):
    """The round is closed, failed or not yet open."""


class FederationStateError(FedcoreError):
    """The federation cannot perform the operation in its current state."""


class NotFound(FedcoreError, LookupError):
    """An unknown federation, round, client, token or model version id."""


class AuthError(FedcoreError):
    """A credential is missing, malformed, revoked or expired."""


class Forbidden(AuthError):
    """A valid credential lacks the role or the federation for the operation."""


class TransportError(FedcoreError):
    """The server could not be reached, or answered with something unusable."""


class BudgetExhausted(FedcoreError):
    """Another round would take a client's ε past its privacy budget; it stops training."""
