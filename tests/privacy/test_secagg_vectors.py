"""Known-answer tests of the primitives SecAgg+ is built on, against published vectors."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from privacy.secagg import ClientIdentity, ProtocolViolation, RoundKeys, expand_mask
from privacy.secagg.cipher import decrypt, encrypt
from privacy.secagg.keys import agree, hkdf_sha256, load_public_key, verify_signature

SUNSCREEN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
    b"the future, sunscreen would be it."
)


@pytest.mark.parametrize(
    ("scalar", "u", "expected"),
    [
        (  # RFC 7748 §5.2, first vector
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (  # RFC 7748 §5.2, second vector
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ],
)
def test_x25519_agreement_matches_rfc7748_section_5_2(scalar: str, u: str, expected: str) -> None:
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(scalar))
    assert agree(private, bytes.fromhex(u)).hex() == expected


def test_x25519_round_keys_and_shared_secret_match_rfc7748_section_6_1() -> None:
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    keys = iter([alice, bob])
    round_keys = RoundKeys.generate(lambda n: next(keys))
    assert round_keys.cipher_public.hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert round_keys.mask_public.hex() == (
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    )
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert agree(round_keys.cipher, round_keys.mask_public).hex() == shared
    assert agree(round_keys.mask, round_keys.cipher_public).hex() == shared


def test_x25519_agreement_rejects_a_low_order_point() -> None:
    private = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    with pytest.raises(ProtocolViolation, match="low-order"):
        agree(private, bytes(32))


def test_x25519_agreement_with_a_loaded_key_matches_rfc7748_section_6_1() -> None:
    # The server loads a survivor's key once for all its vanished neighbours.
    alice = X25519PrivateKey.from_private_bytes(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob = load_public_key(
        bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    )
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert agree(alice, bob).hex() == shared
    with pytest.raises(ProtocolViolation, match="low-order"):
        agree(alice, load_public_key(bytes(32)))
    with pytest.raises(ProtocolViolation, match="31 bytes"):
        load_public_key(bytes(31))


def test_ed25519_identity_matches_rfc8032_test_1() -> None:
    secret = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    signature = (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e3970"
        "1cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    identity = ClientIdentity("c", Ed25519PrivateKey.from_private_bytes(secret))
    assert identity.public_key.hex() == public
    assert identity.sign(b"").hex() == signature
    assert verify_signature(bytes.fromhex(public), b"", bytes.fromhex(signature))
    forged = bytearray(bytes.fromhex(signature))
    forged[0] ^= 1
    assert not verify_signature(bytes.fromhex(public), b"", bytes(forged))
    assert not verify_signature(bytes.fromhex(public), b"x", bytes.fromhex(signature))


def test_hkdf_sha256_matches_rfc5869_test_case_1() -> None:
    okm = hkdf_sha256(
        bytes([0x0B] * 22),
        salt=bytes(range(13)),
        info=bytes(range(0xF0, 0xFA)),
        length=42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_chacha20_encryption_matches_rfc8439_section_2_4_2() -> None:
    nonce = (1).to_bytes(4, "little") + bytes.fromhex("000000000000004a00000000")
    encryptor = Cipher(algorithms.ChaCha20(bytes(range(32)), nonce), mode=None).encryptor()
    assert encryptor.update(SUNSCREEN).hex() == (
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
        "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
        "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d"
    )


def test_mask_expansion_is_the_chacha20_keystream_of_rfc8439_appendix_a1() -> None:
    # Test vector #1 of RFC 8439 A.1: all-zero key, nonce and block counter.
    block = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    words = np.frombuffer(block, dtype="<u4")
    np.testing.assert_array_equal(expand_mask(bytes(32), 16, 32), words)
    np.testing.assert_array_equal(expand_mask(bytes(32), 16, 12), words & 0xFFF)


def test_share_encryption_matches_rfc8439_section_2_8_2() -> None:
    key = bytes(range(0x80, 0xA0))
    nonce = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    sealed = encrypt(key, SUNSCREEN, associated_data=aad, nonce=nonce)
    assert sealed[:12] == nonce
    assert sealed[12:].hex() == (
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
        "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
        "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116"
        "1ae10b594f09e26a7e902ecbd0600691"
    )
    assert decrypt(key, sealed, associated_data=aad) == SUNSCREEN
    with pytest.raises(ProtocolViolation, match="authentication"):
        decrypt(key, sealed, associated_data=aad + b"x")


def test_two_different_seeds_give_different_masks_and_one_seed_the_same_mask() -> None:
    first = bytes(31) + b"\x01"
    second = bytes(31) + b"\x02"
    # Seeds that differ only above the low 32 bits: a 32-bit fold would merge them.
    third = b"\x01" + bytes(30) + b"\x01"
    masks = {seed: expand_mask(seed, 4096, 20) for seed in (first, second, third)}
    np.testing.assert_array_equal(masks[first], expand_mask(first, 4096, 20))
    assert (masks[first] != masks[second]).mean() > 0.99
    assert (masks[first] != masks[third]).mean() > 0.99
    assert masks[first].dtype == np.uint32
    assert masks[first].max() < 1 << 20
