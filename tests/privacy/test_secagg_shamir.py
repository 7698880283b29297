"""Shamir sharing over GF(65537): any t shares recover, fewer do not, fast == slow."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg.shamir import (
    PRIME,
    _tables,
    _vandermonde,
    combine,
    decode_share,
    decode_shares,
    encode_share,
    lagrange_at_zero,
    split,
)


def reference_secret(holders: list[int], shares: np.ndarray) -> bytes:
    """Slow, obvious Lagrange interpolation at 0 with Python integers, limb by limb."""
    limbs = []
    for column in range(shares.shape[1]):
        total = 0
        for i, x_i in enumerate(holders):
            term = int(shares[i, column])
            for j, x_j in enumerate(holders):
                if j != i:
                    term = term * x_j * pow(x_j - x_i, PRIME - 2, PRIME) % PRIME
            total = (total + term) % PRIME
        limbs.append(total)
    return b"".join(limb.to_bytes(2, "little") for limb in limbs)


def reference_shares(coefficients: np.ndarray, holders: list[int]) -> np.ndarray:
    """Evaluate each limb's polynomial at each holder by Horner's rule, in Python ints."""
    rows = []
    for x in holders:
        row = []
        for column in range(coefficients.shape[1]):
            value = 0
            for c in reversed(coefficients[:, column].tolist()):
                value = (value * x + c) % PRIME
            row.append(value)
        rows.append(row)
    return np.array(rows, dtype=np.int64)


@settings(max_examples=40, derandomize=True, deadline=None)
@given(data=st.data(), n=st.integers(2, 60), secret=st.binary(min_size=2, max_size=64))
def test_any_threshold_shares_recover_the_secret(
    data: st.DataObject, n: int, secret: bytes
) -> None:
    secret = secret[: len(secret) // 2 * 2]
    threshold = data.draw(st.integers(1, n))
    holders = data.draw(st.permutations(range(1, n + 1)))
    shares = split(secret, holders=holders, threshold=threshold, entropy=os.urandom)
    chosen = data.draw(st.lists(st.integers(0, n - 1), min_size=threshold, max_size=n, unique=True))
    xs = [holders[i] for i in chosen]
    assert combine(xs, shares[chosen], threshold=threshold) == secret
    assert reference_secret(xs[:threshold], shares[chosen][:threshold]) == secret


def test_fewer_than_threshold_shares_are_refused_and_do_not_interpolate_the_secret() -> None:
    secret = bytes(range(32))
    holders = list(range(1, 11))
    shares = split(secret, holders=holders, threshold=5, entropy=os.urandom)
    with pytest.raises(ValueError, match="cannot recover"):
        combine(holders[:4], shares[:4], threshold=5)
    # Interpolating four shares as if the threshold were four finds another
    # value (or none): the degree-4 polynomial is not determined.
    try:
        guess = combine(holders[:4], shares[:4], threshold=4)
    except ValueError:
        return
    assert guess != secret


def test_split_matches_horner_evaluation_of_the_dealt_polynomial() -> None:
    randomness = np.random.default_rng(7).bytes(4096)
    position = 0

    def entropy(size: int) -> bytes:
        nonlocal position
        position += size
        return randomness[position - size : position]

    secret = bytes(range(16))
    holders = [3, 9, 27, 81, 243]
    shares = split(secret, holders=holders, threshold=3, entropy=entropy)
    words = np.frombuffer(randomness[: 4 * 2 * 8], dtype="<u4").astype(np.int64)
    assert (words != 2**32 - 1).all()  # no rejected word: the coefficients are these
    coefficients = np.vstack([np.frombuffer(secret, dtype="<u2"), (words % PRIME).reshape(2, 8)])
    np.testing.assert_array_equal(shares, reference_shares(coefficients, holders))


def test_lagrange_coefficients_match_the_reference_and_are_cached() -> None:
    holders = [2, 5, 7, 11, 13]
    weights = lagrange_at_zero(holders)
    for i, x_i in enumerate(holders):
        expected = 1
        for x_j in holders:
            if x_j != x_i:
                expected = expected * x_j * pow(x_j - x_i, -1, PRIME) % PRIME
        assert int(weights[i]) == expected
    assert lagrange_at_zero(list(holders)) is weights
    assert not weights.flags.writeable


def test_corrupt_shares_do_not_pass_for_the_secret() -> None:
    secret = bytes(range(32))
    shares = split(secret, holders=[1, 2, 3], threshold=3, entropy=os.urandom)
    shares[0, 0] = (shares[0, 0] + 1) % PRIME
    try:
        recovered = combine([1, 2, 3], shares, threshold=3)
    except ValueError:
        return
    assert recovered != secret


def test_share_encoding_round_trips_and_rejects_values_outside_the_field() -> None:
    row = np.array([0, 1, PRIME - 1, 12345], dtype=np.int64)
    np.testing.assert_array_equal(decode_share(encode_share(row), 4), row)
    with pytest.raises(ValueError, match="outside the field"):
        decode_share(np.array([PRIME, 0, 0, 0], dtype="<u4").tobytes(), 4)
    with pytest.raises(ValueError, match="bytes"):
        decode_share(b"\x00" * 15, 4)


def test_holders_must_be_distinct_non_zero_field_elements() -> None:
    for holders in ([0, 1], [1, 1], [1, PRIME]):
        with pytest.raises(ValueError, match="distinct"):
            split(b"ab", holders=holders, threshold=1, entropy=os.urandom)


def test_three_generates_the_field_and_the_log_tables_invert_each_other() -> None:
    exp, log = _tables()
    assert exp.size == PRIME - 1
    assert sorted(exp.tolist()) == list(range(1, PRIME))  # 3^i takes every non-zero value
    assert int(exp[1]) == 3
    assert int(exp[12345]) == pow(3, 12345, PRIME)
    np.testing.assert_array_equal(log[exp], np.arange(PRIME - 1))


def test_vandermonde_rows_are_the_powers_of_each_holder() -> None:
    holders = np.array([1, 2, 255, 65535, PRIME - 1], dtype=np.int64)
    powers = _vandermonde(holders, 9)
    for i, x in enumerate(holders.tolist()):
        assert powers[i].tolist() == [pow(x, j, PRIME) for j in range(9)]


def test_lagrange_coefficients_of_a_large_spread_holder_set_match_the_reference() -> None:
    rng = np.random.default_rng(11)
    holders = sorted(rng.choice(np.arange(1, PRIME), size=119, replace=False).tolist())
    weights = lagrange_at_zero(holders)
    for i in (0, 1, 58, 118):
        expected = 1
        for x_j in holders:
            if x_j != holders[i]:
                expected = expected * x_j * pow(x_j - holders[i], -1, PRIME) % PRIME
        assert int(weights[i]) == expected
    secret = os.urandom(32)
    shares = split(secret, holders=holders, threshold=119, entropy=os.urandom)
    assert combine(holders, shares, threshold=119) == secret


def test_share_rows_decode_together_and_refuse_partial_rows() -> None:
    rows = np.array([[0, 1, 2, 3], [PRIME - 1, 5, 6, 7]], dtype=np.int64)
    np.testing.assert_array_equal(decode_shares(encode_share(rows), 4), rows)
    with pytest.raises(ValueError, match="whole shares"):
        decode_shares(encode_share(rows)[:-4], 4)
    with pytest.raises(ValueError, match="whole shares"):
        decode_shares(b"", 4)
    with pytest.raises(ValueError, match="outside the field"):
        decode_shares(np.array([[1, 2, 3, 4], [0, 0, PRIME, 0]], dtype="<u4").tobytes(), 4)
