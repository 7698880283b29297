import importlib
import inspect

import pytest

import clients

MODULES = ["client", "digits", "fleet", "http", "torchstate", "trainer", "__main__"]


def test_package_all_is_sorted_and_every_name_resolves() -> None:
    assert clients.__doc__
    assert list(clients.__all__) == sorted(clients.__all__)
    for name in clients.__all__:
        assert getattr(clients, name) is not None, name


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_of_a_module_has_a_docstring(module: str) -> None:
    loaded = importlib.import_module(f"clients.{module}")
    assert loaded.__doc__
    assert list(loaded.__all__) == sorted(loaded.__all__)
    for name in loaded.__all__:
        value = getattr(loaded, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"clients.{module}.{name}"


def test_each_package_name_has_one_import_path() -> None:
    for name in clients.__all__:
        value = getattr(clients, name)
        if inspect.ismodule(value):
            assert value.__name__ == f"clients.{name}"
        elif inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.startswith("clients."), name
