"""Bearer tokens: random, role-prefixed, and stored only as a hash.

Tokens carry 256 bits from the OS CSPRNG (`secrets`), so a single SHA-256 is
enough to store them: unlike passwords they cannot be guessed, and a slow
password hash would only slow every request down.
"""

from __future__ import annotations

import hashlib
import secrets
from enum import StrEnum

__all__ = ["TokenKind", "hash_token", "new_token", "token_kind"]


class TokenKind(StrEnum):
    """The role a token grants, visible in its prefix."""

    ADMIN = "fca"
    CLIENT = "fcc"
    ENROLLMENT = "fce"


def new_token(kind: TokenKind) -> str:
    """Return a fresh random token of `kind`."""
    return f"{kind.value}_{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    """Return the SHA-256 hex digest under which `token` is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_kind(token: str) -> TokenKind | None:
    """Return the kind named by the token's prefix, or None if it has none."""
    prefix, _, rest = token.partition("_")
    if not rest:
        return None
    try:
        return TokenKind(prefix)
    except ValueError:
        return None
