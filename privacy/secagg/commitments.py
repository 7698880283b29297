"""Hash commitments that let the server catch forged shares.

A dealer commits, in its share-keys message, to its self-mask seed and to
each share it sends (SHA-256 over a transcript that binds the federation,
round, dealer, holder and share kind). The server forwards the share
commitments with the ciphertexts, so the holder checks the share it decrypts
before it ever reveals it. At unmask time the server checks every revealed
share against the dealer's commitment: a client that reveals a forged share
is excluded, and the commitment to the seed checks the reconstructed seed.
The committed values are uniformly random and 256 bits long (seeds; shares
of them, 16 field elements), so the commitments reveal nothing about them.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

from privacy.secagg.transcript import commit, extend, prefix

__all__ = ["ShareKind", "seed_commitment", "share_commitment"]


class ShareKind(StrEnum):
    """Which secret a share belongs to.

    KEY: the private mask key, revealed for neighbours that dropped before
    sending their masked input, so the server can remove their pairwise masks.
    SEED: the self-mask seed, revealed for neighbours that survived, so the
    server can remove their self masks. Never both for the same neighbour.
    """

    KEY = "key"
    SEED = "seed"


def share_commitment(
    kind: ShareKind, *, federation_id: str, round: int, parties: tuple[str, str], share: bytes
) -> bytes:
    """Commit to the `kind` share that a dealer gave a holder; `parties` is (dealer, holder)."""
    dealer, holder = parties
    # frame("share", kind, federation, round, dealer, holder, share), with the
    # round's leading fields encoded once (`transcript.prefix`).
    start = prefix("share", kind.value, federation_id, round)
    return hashlib.sha256(extend(start, dealer, holder, share)).digest()


def seed_commitment(*, federation_id: str, round: int, owner: str, seed: bytes) -> bytes:
    """Commit to `owner`'s self-mask seed."""
    return commit("seed", federation_id, round, owner, seed)
