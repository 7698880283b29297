"""Known-answer tests of the primitives SecAgg+ is built on, against published vectors."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

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
    # ChaCha20 is still the keystream of the neighbour graph's shuffle and,
    # inside ChaCha20-Poly1305, of the share encryption.
    nonce = (1).to_bytes(4, "little") + bytes.fromhex("000000000000004a00000000")
    encryptor = Cipher(algorithms.ChaCha20(bytes(range(32)), nonce), mode=None).encryptor()
    assert encryptor.update(SUNSCREEN).hex() == (
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
        "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
        "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d"
    )


def test_aes256_ctr_matches_nist_sp800_38a_appendix_f_5_5() -> None:
    # CTR-AES256.Encrypt: four blocks from counter f0f1...feff; the second
    # carries out of the lowest byte (feff + 1 = ff00): the counter is the
    # whole 128-bit block, incremented as a big-endian integer.
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plaintext = bytes.fromhex(
        "6bc1bee22e409f96e93d7e117393172a"
        "ae2d8a571e03ac9c9eb76fac45af8e51"
        "30c81c46a35ce411e5fbc1191a0a52ef"
        "f69f2445df4f9b17ad2b417be66c3710"
    )
    encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    assert encryptor.update(plaintext).hex() == (
        "601ec313775789a5b7a7f504bbf3d228"
        "f443e3ca4d62b59aca84e990cacaf5c5"
        "2b0930daa23de94ce87017ba2d84988d"
        "dfc9c58db67aada613c2dd08457941a6"
    )


# AES-256 under the all-zero key of the counter blocks 0, 1 and 2: H, E(K, Y0)
# and E(K, Y1) of test cases 13 and 14 of the GCM specification (McGrew and
# Viega, "The Galois/Counter Mode of Operation", 2005, appendix B; the tag of
# case 13 is E(K, Y0) because GHASH of nothing is zero, and the ciphertext of
# case 14 is E(K, Y1) because its plaintext is zero).
ZERO_KEY_BLOCKS = bytes.fromhex(
    "dc95c078a2408989ad48a21492842087"
    "530f8afbc74536b9a963b4f1c4cb738b"
    "cea7403d4d606b6e074ec5d3baf39d18"
)


def test_mask_expansion_is_the_aes256_ctr_keystream_from_counter_zero() -> None:
    words = np.frombuffer(ZERO_KEY_BLOCKS, dtype="<u4")
    np.testing.assert_array_equal(expand_mask(bytes(32), 12, 32), words)
    np.testing.assert_array_equal(expand_mask(bytes(32), 12, 12), words & 0xFFF)
    np.testing.assert_array_equal(expand_mask(bytes(32), 6, 64), words.view("<u8"))


@pytest.mark.parametrize(("offset", "length"), [(4, 8), (8, 4), (1, 11), (6, 5), (11, 1)])
def test_a_seeked_mask_expansion_continues_the_published_keystream(
    offset: int, length: int
) -> None:
    words = np.frombuffer(ZERO_KEY_BLOCKS, dtype="<u4")
    expanded = expand_mask(bytes(32), length, 32, offset=offset)
    np.testing.assert_array_equal(expanded, words[offset : offset + length])


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
