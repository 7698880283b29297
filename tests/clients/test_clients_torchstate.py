import numpy as np
import pytest
import torch

from clients import copy_into, to_parameters, to_state_dict
from clients.torchstate import StateViews
from fedcore import ParameterSet, TensorMismatch, wire


class MixedModel(torch.nn.Module):
    """A model holding every dtype the wire format carries."""

    brain: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.norm = torch.nn.BatchNorm1d(3)
        self.register_buffer("halves", torch.linspace(-1, 1, 5, dtype=torch.float16))
        self.register_buffer("brain", torch.linspace(-3, 3, 7, dtype=torch.bfloat16))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("small", torch.arange(-4, 4, dtype=torch.int8))
        self.register_buffer("wide", torch.arange(6, dtype=torch.float64).reshape(2, 3))


def trained_model() -> MixedModel:
    torch.manual_seed(0)
    model = MixedModel()
    model.train()
    model.norm(model.linear(torch.randn(8, 4)))
    return model


def test_to_parameters_keeps_every_dtype_and_order() -> None:
    model = trained_model()
    params = to_parameters(model.state_dict())
    assert list(params) == list(model.state_dict())
    dtypes = {name: str(a.dtype) for name, a in params.items()}
    assert dtypes["linear.weight"] == "float32"
    assert dtypes["norm.num_batches_tracked"] == "int64"
    assert dtypes["halves"] == "float16"
    assert dtypes["brain"] == "bfloat16"
    assert dtypes["mask"] == "bool"
    assert dtypes["small"] == "int8"
    assert dtypes["wide"] == "float64"
    assert int(params["norm.num_batches_tracked"]) == 1


def test_round_trip_through_state_dict_is_exact_for_every_dtype() -> None:
    model = trained_model()
    back = to_state_dict(to_parameters(model.state_dict()))
    for name, tensor in model.state_dict().items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name
    fresh = MixedModel()
    fresh.load_state_dict(back)
    assert torch.equal(fresh.brain, model.brain)


def test_round_trip_through_the_wire_format_is_exact() -> None:
    model = trained_model()
    params, _ = wire.decode(wire.encode(to_parameters(model.state_dict())))
    back = to_state_dict(params)
    for name, tensor in model.state_dict().items():
        assert back[name].dtype == tensor.dtype
        assert torch.equal(back[name], tensor), name


def test_cpu_tensors_share_memory_unless_copied() -> None:
    model = trained_model()
    shared = to_parameters(model.state_dict())
    owned = to_parameters(model.state_dict(), copy=True)
    with torch.no_grad():
        model.linear.weight.add_(1.0)
        model.brain.add_(1.0)
    assert np.array_equal(shared["linear.weight"], model.linear.weight.detach().numpy())
    assert float(shared["brain"][0]) == float(model.brain[0])
    assert not np.array_equal(owned["linear.weight"], shared["linear.weight"])


def test_to_state_dict_shares_writable_arrays_and_copies_read_only_ones() -> None:
    writable = np.arange(4, dtype=np.float32)
    read_only = np.arange(4, dtype=np.float32)
    read_only.flags.writeable = False
    tensors = to_state_dict({"w": writable, "r": read_only})
    writable[0] = 42.0
    assert tensors["w"][0] == 42.0
    assert tensors["r"].data_ptr() != read_only.ctypes.data


def test_to_state_dict_like_takes_dtype_and_checks_names_and_shapes() -> None:
    like = {"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(3)}
    out = to_state_dict({"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)}, like=like)
    assert out["a"].dtype == torch.bfloat16
    with pytest.raises(TensorMismatch, match=r"missing tensor 'b'.*shape \(3,\)"):
        to_state_dict({"a": np.ones(3, np.float32)}, like=like)


def test_copy_into_loads_a_model_in_place_from_read_only_arrays() -> None:
    source = trained_model()
    target = MixedModel()
    state = target.state_dict()
    before = target.linear.weight.data_ptr()
    params, _ = wire.decode(wire.encode(to_parameters(source.state_dict())))
    copy_into(state, params)
    assert target.linear.weight.data_ptr() == before
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_copy_into_refuses_other_tensor_names() -> None:
    state = MixedModel().state_dict()
    params = dict(to_parameters(state, copy=True))
    del params["mask"]
    with pytest.raises(TensorMismatch, match="missing tensor 'mask'"):
        copy_into(state, params)


def test_state_views_load_like_copy_into_for_every_dtype() -> None:
    source = trained_model()
    params, _ = wire.decode(wire.encode(to_parameters(source.state_dict())))
    by_function, by_views = MixedModel(), MixedModel()
    copy_into(by_function.state_dict(), params)
    before = by_views.linear.weight.data_ptr()
    StateViews(by_views.state_dict()).load(params)
    assert by_views.linear.weight.data_ptr() == before
    for name, tensor in by_function.state_dict().items():
        assert torch.equal(by_views.state_dict()[name], tensor), name


def test_state_views_load_casts_other_dtypes_like_copy_into() -> None:
    model = MixedModel()
    views = StateViews(model.state_dict())
    params = dict(to_parameters(model.state_dict(), copy=True))
    params["linear.weight"] = np.full((3, 4), 1 / 3, dtype=np.float64)
    views.load(params)
    assert model.linear.weight.dtype == torch.float32
    assert torch.equal(model.linear.weight, torch.full((3, 4), 1 / 3, dtype=torch.float32))


def test_state_views_read_copies_what_the_model_holds_after_training() -> None:
    model = trained_model()
    views = StateViews(model.state_dict())
    with torch.no_grad():
        model.linear.weight.add_(1.0)  # in place, as SGD steps are
    names = list(reversed(list(model.state_dict())))
    read = views.read(names)
    want = to_parameters({n: model.state_dict()[n] for n in names}, copy=True)
    assert list(read) == names
    for name, array in want.items():
        assert read[name].dtype == array.dtype, name
        assert read[name].tobytes() == array.tobytes(), name
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    assert read["linear.weight"].tobytes() == want["linear.weight"].tobytes()


def test_state_views_refuse_other_tensor_names_and_shapes() -> None:
    state = MixedModel().state_dict()
    views = StateViews(state)
    params = dict(to_parameters(state, copy=True))
    del params["mask"]
    params["small"] = np.zeros(3, np.int8)
    with pytest.raises(TensorMismatch, match=r"missing tensor 'mask'.*'small' has shape"):
        views.load(ParameterSet(params))


def test_unsupported_dtype_is_refused_with_its_name() -> None:
    with pytest.raises(TypeError, match=r"'z'.*complex64"):
        to_parameters({"z": torch.zeros(2, dtype=torch.complex64)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_copied_to_host_and_back() -> None:
    model = trained_model().cuda()
    params = to_parameters(model.state_dict())
    assert str(params["brain"].dtype) == "bfloat16"
    back = to_state_dict(params, like=model.state_dict())
    for name, tensor in model.state_dict().items():
        assert back[name].device == tensor.device
        assert torch.equal(back[name], tensor), name
    target = MixedModel().cuda()
    copy_into(target.state_dict(), params)
    assert torch.equal(target.brain, model.brain)
    views = StateViews(MixedModel().cuda().state_dict())
    views.load(params)
    read = views.read(params)
    for name, array in params.items():
        assert read[name].tobytes() == array.tobytes(), name
