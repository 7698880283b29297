"""ParameterSet, TensorSpec and dtype names."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from fedcore import ParameterSet, TensorSpec, as_dtype

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_as_dtype_knows_bfloat16_and_numpy_names() -> None:
    assert as_dtype("bfloat16") == BF16
    assert as_dtype("float32") == np.float32
    assert as_dtype("int64") == np.int64


def test_as_dtype_refuses_unknown_names_with_type_error() -> None:
    with pytest.raises(TypeError, match="float33"):
        as_dtype("float33")


def test_tensor_spec_reports_size_and_integer_kinds() -> None:
    assert TensorSpec("float32", (2, 3)).size == 6
    assert TensorSpec("float32", ()).size == 1
    assert TensorSpec("float32", (0, 5)).size == 0
    assert TensorSpec("int64", ()).is_integer
    assert TensorSpec("uint8", (1,)).is_integer
    assert TensorSpec("bool", (1,)).is_integer
    assert not TensorSpec("bfloat16", (1,)).is_integer
    assert not TensorSpec("float16", (1,)).is_integer


@pytest.mark.parametrize(
    ("arrays", "error"),
    [
        ({"": np.zeros(1)}, "non-empty"),
        ({1: np.zeros(1)}, "non-empty"),
        ({"w": [1.0, 2.0]}, "numpy array"),
        ({"w": 3.0}, "numpy array"),
    ],
)
def test_parameter_set_refuses_bad_names_and_non_arrays(arrays: Any, error: str) -> None:
    with pytest.raises(TypeError, match=error):
        ParameterSet(arrays)


def test_parameter_set_keeps_insertion_order_and_describes_itself() -> None:
    params = ParameterSet(
        {"z": np.zeros((2, 3), np.float32), "a": np.zeros(4, BF16), "n": np.array(1, np.int64)}
    )
    assert list(params) == ["z", "a", "n"]
    assert len(params) == 3
    assert params.num_parameters == 11
    assert params.nbytes == 6 * 4 + 4 * 2 + 8
    assert params.spec() == {
        "z": TensorSpec("float32", (2, 3)),
        "a": TensorSpec("bfloat16", (4,)),
        "n": TensorSpec("int64", ()),
    }
    assert "3 tensors" in repr(params)


def test_parameter_set_does_not_copy_the_arrays() -> None:
    w = np.zeros(3)
    assert ParameterSet({"w": w})["w"] is w


def test_copy_owns_its_memory() -> None:
    w = np.zeros(3, np.float32)
    copy = ParameterSet({"w": w}).copy()
    w[0] = 5.0
    assert copy["w"][0] == 0.0
    assert copy["w"].flags.owndata


def test_subtract_gives_deltas_in_each_tensors_dtype() -> None:
    trained = ParameterSet(
        {
            "w": np.array([1.5, 2.0], np.float32),
            "h": np.array([1.0], np.float16),
            "bf": np.array([2.0], BF16),
            "n": np.array(8, np.int64),
        }
    )
    received = ParameterSet(
        {
            "w": np.array([1.0, 3.0], np.float32),
            "h": np.array([0.5], np.float16),
            "bf": np.array([0.5], BF16),
            "n": np.array(5, np.int64),
        }
    )
    delta = trained.subtract(received)
    np.testing.assert_array_equal(delta["w"], [0.5, -1.0])
    assert {n: a.dtype for n, a in delta.items()} == {n: a.dtype for n, a in trained.items()}
    assert isinstance(delta["n"], np.ndarray)
    assert delta["n"].shape == ()
    assert delta["n"] == 3


def test_subtract_wraps_unsigned_and_xors_booleans() -> None:
    trained = ParameterSet({"u": np.array([1, 9], np.uint8), "b": np.array([True, True, False])})
    received = ParameterSet({"u": np.array([3, 4], np.uint8), "b": np.array([True, False, False])})
    delta = trained.subtract(received)
    np.testing.assert_array_equal(delta["u"], np.array([254, 5], np.uint8))
    np.testing.assert_array_equal(delta["b"], [False, True, False])
    assert delta["b"].dtype == np.bool_


def test_subtract_refuses_different_names_or_shapes() -> None:
    a = ParameterSet({"w": np.zeros(2), "b": np.zeros(1)})
    with pytest.raises(ValueError, match="names"):
        a.subtract(ParameterSet({"w": np.zeros(2)}))
    with pytest.raises(ValueError, match="shape"):
        a.subtract(ParameterSet({"w": np.zeros(3), "b": np.zeros(1)}))
