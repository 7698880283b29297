"""`ParameterSet`: an ordered mapping of tensor names to numpy arrays."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

__all__ = ["Array", "ParameterSet", "TensorSpec", "as_dtype"]

Array = npt.NDArray[Any]

# numpy has no bfloat16; ml_dtypes (maintained with JAX) provides one that numpy
# arithmetic and casting understand, so bfloat16 models keep their dtype.
_EXTRA_DTYPES: dict[str, np.dtype[Any]] = {"bfloat16": np.dtype(ml_dtypes.bfloat16)}


@functools.cache
def as_dtype(name: str) -> np.dtype[Any]:
    """Return the numpy dtype called `name`, bfloat16 included.

    Raises:
        TypeError: `name` is not a dtype numpy or ml_dtypes knows.
    """
    if name in _EXTRA_DTYPES:
        return _EXTRA_DTYPES[name]
    try:
        return np.dtype(name)
    except TypeError as exc:
        raise TypeError(f"unknown dtype {name!r}; use a numpy dtype name or 'bfloat16'") from exc


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Dtype and shape of one tensor, used to check updates against a model."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_integer(self) -> bool:
        """Whether the tensor holds integers (or booleans), e.g. a step counter."""
        return as_dtype(self.dtype).kind in "iub"


class ParameterSet(Mapping[str, Array]):
    """An ordered, read-only mapping of tensor names to numpy arrays.

    The arrays themselves are not copied: a set built from memory-mapped arrays
    stays memory-mapped. Names keep their insertion order, which is the order of
    the model's `state_dict`.
    """

    __slots__ = ("_arrays",)

    def __init__(self, arrays: Mapping[str, Array] | None = None) -> None:
        self._arrays: dict[str, Array] = {}
        for name, value in (arrays or {}).items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
            if not isinstance(value, np.ndarray):
                raise TypeError(f"tensor {name!r} must be a numpy array, got {type(value)!r}")
            self._arrays[name] = value

    def __getitem__(self, name: str) -> Array:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return f"ParameterSet({len(self)} tensors, {self.num_parameters} parameters)"

    @property
    def num_parameters(self) -> int:
        """Total number of elements over all tensors."""
        return sum(int(a.size) for a in self._arrays.values())

    @property
    def nbytes(self) -> int:
        """Total size of the tensors in bytes."""
        return sum(int(a.nbytes) for a in self._arrays.values())

    def spec(self) -> dict[str, TensorSpec]:
        """Return the name → (dtype, shape) description of this set."""
        return {
            name: TensorSpec(dtype=str(a.dtype), shape=tuple(int(d) for d in a.shape))
            for name, a in self._arrays.items()
        }

    def copy(self) -> ParameterSet:
        """Return a deep copy that owns its memory."""
        return ParameterSet({name: np.array(a, copy=True) for name, a in self._arrays.items()})

    def subtract(self, other: Mapping[str, Array]) -> ParameterSet:
        """Return `self - other` tensor by tensor, in each tensor's own dtype.

        This is how a client turns its trained model into an update (a delta).
        Integer differences wrap around like the dtype does (modulo 2**bits for
        unsigned tensors); boolean tensors are integers modulo 2, so their
        difference is the exclusive or (True where the value flipped).

        Raises:
            ValueError: the two sets have different names or shapes.
        """
        if list(other) != list(self._arrays):
            raise ValueError("cannot subtract parameter sets with different tensor names")
        out: dict[str, Array] = {}
        for name, a in self._arrays.items():
            b = other[name]
            if a.shape != b.shape:
                raise ValueError(f"tensor {name!r}: shape {a.shape} differs from {b.shape}")
            # asarray: on 0-d tensors (step counters) ufuncs return numpy scalars.
            if a.dtype == np.bool_:
                # numpy refuses `-` on booleans; XOR is subtraction modulo 2.
                out[name] = np.asarray(np.not_equal(a, b))
            else:
                out[name] = np.asarray(np.subtract(a, b, dtype=a.dtype))
        return ParameterSet(out)
