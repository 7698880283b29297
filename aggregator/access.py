"""Who may do what: admin tokens, client credentials and enrollment.

Tokens are checked here and only here; the HTTP layer passes the raw bearer
string in and gets a record or a `fedcore.AuthError` out.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable

from aggregator.config import FederationSettings
from aggregator.records import AdminTokenRecord, ClientRecord, EnrollmentTokenRecord
from aggregator.store import Store, Transaction
from aggregator.tokens import TokenKind, hash_token, new_token, token_kind
from fedcore import AuthError, Enrollment, Forbidden, NotFound

__all__ = ["IDENTITY_KEY_BYTES", "Access", "check_client_token", "client_of"]

# A raw Ed25519 public key (RFC 8032 section 5.1.5).
IDENTITY_KEY_BYTES = 32


class Access:
    """Issues, checks and revokes credentials stored in a `Store`."""

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock

    def create_admin_token(self, name: str) -> str:
        """Issue a new admin token and return it (the only time it is visible)."""
        token = new_token(TokenKind.ADMIN)
        record = AdminTokenRecord(hash_token(token), name, self._clock())
        with self._store.transaction() as tx:
            tx.add_admin_token(record)
        return token

    def ensure_admin_token(self, token: str, name: str) -> None:
        """Register a given admin token (e.g. from the environment) if it is new.

        Raises:
            ValueError: `token` does not carry the admin prefix.
        """
        if token_kind(token) is not TokenKind.ADMIN:
            raise ValueError("an admin token must start with 'fca_'; create one with new_token")
        digest = hash_token(token)
        with self._store.transaction() as tx:
            if tx.get_admin_token(digest) is None:
                tx.add_admin_token(AdminTokenRecord(digest, name, self._clock()))

    def has_admin_tokens(self) -> bool:
        """Whether any admin token was ever issued."""
        with self._store.read() as tx:
            return tx.count_admin_tokens() > 0

    def revoke_admin_token(self, token: str) -> None:
        """Revoke an admin token."""
        with self._store.transaction() as tx:
            tx.update_admin_token(hash_token(token), revoked=True)

    def authenticate_admin(self, token: str | None) -> AdminTokenRecord:
        """Return the admin token record for a bearer token.

        Raises:
            AuthError: the token is missing, malformed, unknown or revoked.
            Forbidden: the token is a client or enrollment token.
        """
        kind = _kind_of(token)
        if kind is not TokenKind.ADMIN:
            raise Forbidden("this route needs an admin token; client tokens cannot use it")
        with self._store.read() as tx:
            record = tx.get_admin_token(hash_token(str(token)))
        if record is None or record.revoked:
            raise AuthError("unknown or revoked admin token")
        return record

    def authenticate_client(self, token: str | None) -> ClientRecord:
        """Return the client a bearer token belongs to.

        Raises:
            AuthError: the token is missing, malformed, unknown or revoked.
            Forbidden: the token is an admin or enrollment token.
        """
        with self._store.read() as tx:
            record = tx.find_client_by_token(hash_token(check_client_token(token)))
        if record is None or record.revoked:
            raise AuthError("unknown or revoked client token")
        return record

    def create_enrollment_tokens(
        self, federation_id: str, count: int, ttl_s: float
    ) -> tuple[list[str], float]:
        """Issue `count` one-time enrollment tokens valid for `ttl_s` seconds.

        Returns:
            The tokens and their expiry time (POSIX seconds).
        """
        if not 1 <= count <= 1000 or ttl_s <= 0:
            raise ValueError(f"count must be 1..1000 and ttl_s > 0, got {count} and {ttl_s}")
        now = self._clock()
        tokens = [new_token(TokenKind.ENROLLMENT) for _ in range(count)]
        with self._store.transaction() as tx:
            if tx.get_federation(federation_id) is None:
                raise NotFound(f"unknown federation {federation_id!r}")
            for token in tokens:
                record = EnrollmentTokenRecord(hash_token(token), federation_id, now + ttl_s, now)
                tx.add_enrollment_token(record)
        return tokens, now + ttl_s

    def enroll(
        self, enrollment_token: str | None, *, identity_key: bytes | None = None
    ) -> Enrollment:
        """Exchange a one-time enrollment token for a client credential.

        Args:
            enrollment_token: the one-time token ('fce_...').
            identity_key: the client's raw 32-byte Ed25519 public key, which
                signs its secure aggregation keys; required by secure
                federations.

        Raises:
            AuthError: the token is missing, malformed, unknown, used, revoked
                or expired.
            Forbidden: the federation uses secure aggregation and no valid
                identity key was given (the token stays unused).
        """
        if _kind_of(enrollment_token) is not TokenKind.ENROLLMENT:
            raise AuthError("enrollment needs an enrollment token ('fce_...') from an admin")
        _check_identity_key(identity_key)
        digest = hash_token(str(enrollment_token))
        now = self._clock()
        with self._store.transaction() as tx:
            record = _usable(tx.get_enrollment_token(digest), now)
            _require_identity(tx, record.federation_id, identity_key)
            client_id = f"c_{secrets.token_hex(8)}"
            token = new_token(TokenKind.CLIENT)
            client = ClientRecord(client_id, record.federation_id, hash_token(token), now, 0.0)
            tx.add_client(dataclasses.replace(client, identity_key=identity_key))
            tx.update_enrollment_token(digest, client_id=client_id)
        return Enrollment(
            federation_id=record.federation_id,
            client_id=client_id,
            token=token,
            identity_key=None if identity_key is None else identity_key.hex(),
        )

    def revoke_client(self, federation_id: str, client_id: str) -> ClientRecord:
        """Revoke a client's credential; its later requests get 401.

        Revoking a revoked client again returns it unchanged.

        Raises:
            NotFound: the federation has no such client.
        """
        with self._store.transaction() as tx:
            client = tx.get_client(client_id)
            if client is None or client.federation_id != federation_id:
                raise NotFound(
                    f"federation {federation_id[:80]!r} has no client {client_id[:80]!r}"
                )
            return tx.update_client(client_id, revoked=True)


def client_of(tx: Transaction, client_id: str, federation_id: str) -> ClientRecord:
    """Return an active client of `federation_id`.

    Raises:
        AuthError: the client is unknown or revoked.
        Forbidden: the client belongs to another federation.
    """
    client = tx.get_client(client_id)
    if client is None or client.revoked:
        raise AuthError("unknown or revoked client")
    if client.federation_id != federation_id:
        raise Forbidden("this client is enrolled in another federation")
    return client


def check_client_token(token: str | None) -> str:
    """Return `token` if it has the form of a client token; no I/O.

    Raises:
        AuthError: the token is missing or malformed.
        Forbidden: the token is an admin or enrollment token.
    """
    if _kind_of(token) is not TokenKind.CLIENT:
        raise Forbidden("this route needs a client token from /v1/enroll")
    return str(token)


def _kind_of(token: str | None) -> TokenKind | None:
    if not token:
        raise AuthError("missing bearer token")
    kind = token_kind(token)
    if kind is None:
        raise AuthError("malformed bearer token")
    return kind


def _usable(record: EnrollmentTokenRecord | None, now: float) -> EnrollmentTokenRecord:
    if record is None or record.revoked:
        raise AuthError("unknown or revoked enrollment token")
    if record.client_id is not None:
        raise AuthError("enrollment token already used")
    if record.expires_at <= now:
        raise AuthError("enrollment token expired; ask an admin for a new one")
    return record


def _check_identity_key(identity_key: bytes | None) -> None:
    if identity_key is not None and len(identity_key) != IDENTITY_KEY_BYTES:
        raise Forbidden(
            f"identity_key holds {len(identity_key)} bytes; it must be a raw "
            f"{IDENTITY_KEY_BYTES}-byte Ed25519 public key"
        )


def _require_identity(tx: Transaction, federation_id: str, identity_key: bytes | None) -> None:
    fed = tx.get_federation(federation_id)
    if identity_key is not None or fed is None:
        return
    if FederationSettings.model_validate_json(fed.config_json).secure_aggregation:
        raise Forbidden(
            "this federation uses secure aggregation: enroll with an identity_key "
            "(the client's 32-byte Ed25519 public key, hex or base64)"
        )
