"""Conversion between torch `state_dict`s and `fedcore.ParameterSet`s.

Every dtype a model holds keeps its dtype: float32, float16, bfloat16, the
integer step counters of BatchNorm (`num_batches_tracked`, int64) and bool
masks. numpy has no bfloat16, so bfloat16 tensors are reinterpreted bit for
bit as `ml_dtypes.bfloat16` arrays (through an int16 view, which costs no
copy). CPU tensors and arrays share memory where torch allows it; CUDA
tensors are copied to host memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
import torch

from fedcore import Array, ParameterSet, TensorMismatch

__all__ = ["StateViews", "copy_into", "to_parameters", "to_state_dict"]

_BFLOAT16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
# The dtypes the wire format (safetensors) can carry; anything else, such as
# complex or float8, is refused here rather than failing later on the wire.
_SUPPORTED = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)
# The numpy dtype of each torch dtype, looked up: deriving it from the name
# (`str` of a dtype runs Python code) cost more than the copy of a small tensor.
_NUMPY_DTYPES: dict[torch.dtype, np.dtype[Any]] = {
    dtype: _BFLOAT16 if dtype == torch.bfloat16 else np.dtype(str(dtype).removeprefix("torch."))
    for dtype in _SUPPORTED
}


def to_parameters(state_dict: Mapping[str, torch.Tensor], *, copy: bool = False) -> ParameterSet:
    """Return the tensors of `state_dict` as a parameter set, in the same order.

    Args:
        state_dict: name → tensor, e.g. `model.state_dict()`.
        copy: return arrays that own their memory. Without it, arrays of CPU
            tensors are views that change when the model trains.

    Raises:
        TypeError: a tensor has a dtype the wire format cannot carry.
    """
    return ParameterSet({name: _to_array(name, t, copy=copy) for name, t in state_dict.items()})


def to_state_dict(
    params: Mapping[str, Array], like: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Return `params` as CPU tensors, or placed like the tensors of `like`.

    Writable arrays are shared with the tensors; read-only arrays (such as those
    decoded from the wire) are copied, because torch cannot wrap read-only
    memory safely.

    Args:
        params: name → numpy array.
        like: a state dict whose device and dtype each tensor takes, e.g. the
            state dict of the model the result is loaded into.

    Raises:
        TensorMismatch: `like` has other tensor names or shapes than `params`.
        TypeError: an array has a dtype torch does not know.
    """
    if like is not None:
        _check_names_and_shapes(params, {n: tuple(t.shape) for n, t in like.items()})
    out: dict[str, torch.Tensor] = {}
    for name, array in params.items():
        tensor = _to_tensor(name, array)
        if like is not None:
            tensor = tensor.to(device=like[name].device, dtype=like[name].dtype)
        out[name] = tensor
    return out


def copy_into(tensors: Mapping[str, torch.Tensor], params: Mapping[str, Array]) -> None:
    """Overwrite `tensors` in place with the values of `params`.

    This loads a model without allocating new tensors: pass
    `model.state_dict()` (whose tensors share the model's memory). Values are
    cast to each tensor's dtype.

    Raises:
        TensorMismatch: the names or shapes of `params` differ from `tensors`.
    """
    if not _same_layout(tensors, params):
        _check_names_and_shapes(params, {n: tuple(t.shape) for n, t in tensors.items()})
    with torch.no_grad():
        for name, target in tensors.items():
            source = params[name]
            # None is tested apart: numpy reads `dtype == None` as `dtype == float64`.
            expected = _NUMPY_DTYPES.get(target.dtype)
            if target.is_cpu and expected is not None and source.dtype == expected:
                # Copying through numpy reads read-only sources without the
                # copy (and the warning) that wrapping them in a tensor costs.
                np.copyto(_view(target), source)
            else:
                target.copy_(_to_tensor(name, source))


class StateViews:
    """A state dict with numpy views of its CPU tensors, made once for many loads and reads.

    `load` is `copy_into` and `read` is `to_parameters(..., copy=True)`,
    without looking up each tensor's numpy view, dtype and device on every
    call: for a small model that bookkeeping cost as much as the copies. The
    views stay valid while the model keeps its tensors (training and loading
    write into them in place); after moving the model or replacing its
    tensors, build a new one.
    """

    __slots__ = ("_tensors", "_views")

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep `tensors` (e.g. `model.state_dict()`) and a numpy view of each CPU tensor."""
        self._tensors = dict(tensors)
        # None where numpy cannot alias the tensor (CUDA, or no wire dtype):
        # those take the general path.
        self._views: dict[str, Array | None] = {
            name: _view(t.detach()) if t.is_cpu and t.dtype in _SUPPORTED else None
            for name, t in self._tensors.items()
        }

    def load(self, params: Mapping[str, Array]) -> None:
        """Overwrite the tensors in place with the values of `params`; see `copy_into`.

        Raises:
            TensorMismatch: the names or shapes of `params` differ from the tensors'.
        """
        if not _same_layout(self._tensors, params):
            _check_names_and_shapes(params, {n: tuple(t.shape) for n, t in self._tensors.items()})
        for name, view in self._views.items():
            source = params[name]
            if view is not None and source.dtype == view.dtype:
                np.copyto(view, source)
            else:
                with torch.no_grad():
                    self._tensors[name].copy_(_to_tensor(name, source))

    def read(self, names: Iterable[str]) -> ParameterSet:
        """Return copies of the tensors `names`, in that order, as a parameter set.

        Raises:
            KeyError: a name is not one of the tensors.
            TypeError: a tensor has a dtype the wire format cannot carry.
        """
        views = self._views
        return ParameterSet(
            {
                name: view.copy()
                if (view := views[name]) is not None
                else _to_array(name, self._tensors[name], copy=True)
                for name in names
            }
        )


def _to_array(name: str, tensor: torch.Tensor, *, copy: bool) -> Array:
    if tensor.dtype not in _SUPPORTED:
        raise TypeError(
            f"tensor {name!r} has dtype {tensor.dtype}, which the wire format cannot carry; "
            "convert it to a float, integer or bool dtype"
        )
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
        copy = False
    array = _view(t)
    return np.array(array, copy=True) if copy else array


def _view(tensor: torch.Tensor) -> Array:
    """Return the numpy array sharing the memory of CPU `tensor`."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_BFLOAT16)
    return tensor.numpy()


def _to_tensor(name: str, array: Array) -> torch.Tensor:
    if not array.flags.writeable or any(s < 0 for s in array.strides):
        array = np.array(array, copy=True)
    try:
        if array.dtype == _BFLOAT16:
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    except TypeError as exc:
        raise TypeError(
            f"array {name!r} has dtype {array.dtype}, which torch does not support"
        ) from exc


def _same_layout(tensors: Mapping[str, torch.Tensor], params: Mapping[str, Array]) -> bool:
    """Whether `params` has exactly the names and shapes of `tensors` (the fast common case)."""
    if len(params) != len(tensors):
        return False
    for name, tensor in tensors.items():
        array = params.get(name)
        if array is None or array.shape != tensor.shape:
            return False
    return True


def _check_names_and_shapes(
    params: Mapping[str, Array], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    problems = [f"missing tensor {n!r}" for n in shapes if n not in params]
    problems += [f"unexpected tensor {n!r}" for n in params if n not in shapes]
    problems += [
        f"tensor {n!r} has shape {tuple(params[n].shape)}, expected {shape}"
        for n, shape in shapes.items()
        if n in params and tuple(params[n].shape) != shape
    ]
    if problems:
        raise TensorMismatch("; ".join(problems))
