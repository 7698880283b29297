"""Federation configuration: every problem is reported at once."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from fedcore import ConfigError, FedcoreError, FederationConfig, StrategyName, parse_config


def valid() -> dict[str, Any]:
    return {"name": "mnist", "rounds": 10, "clients_per_round": 5}


def test_minimal_config_parses_with_defaults() -> None:
    config = parse_config(valid())
    assert isinstance(config, FederationConfig)
    assert config.min_clients == 1
    assert config.strategy is StrategyName.FEDAVG
    assert config.train.local_epochs == 1


def test_three_bad_fields_give_three_problems_each_naming_its_field() -> None:
    data = valid() | {"rounds": 0, "server_lr": -1.0, "train": {"batch_size": 0}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    problems = info.value.problems
    assert len(problems) == 3
    assert [p.split(":")[0] for p in problems] == ["rounds", "server_lr", "train.batch_size"]
    for problem in problems:
        assert problem in str(info.value)


def test_min_clients_above_clients_per_round_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(valid() | {"min_clients": 6})
    (problem,) = info.value.problems
    assert "min_clients (6)" in problem
    assert "clients_per_round (5)" in problem


def test_min_clients_problem_is_listed_together_with_other_problems() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(valid() | {"name": "", "min_clients": 6})
    assert len(info.value.problems) == 2
    assert any(p.startswith("name:") for p in info.value.problems)
    assert any("min_clients (6)" in p for p in info.value.problems)


def test_min_clients_equal_to_clients_per_round_is_accepted() -> None:
    assert parse_config(valid() | {"min_clients": 5}).min_clients == 5


def test_unknown_fields_and_strategies_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(valid() | {"strategy": "krum-ish", "colour": "blue"})
    fields = sorted(p.split(":")[0] for p in info.value.problems)
    assert fields == ["colour", "strategy"]


def test_config_that_is_not_a_mapping_is_one_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(["not", "a", "mapping"])
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("config:")


def test_config_error_is_a_value_error_and_a_fedcore_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({})
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, FedcoreError)
    assert {p.split(":")[0] for p in info.value.problems} == {"name", "rounds", "clients_per_round"}


def test_config_is_frozen() -> None:
    config = parse_config(valid())
    with pytest.raises(ValidationError):
        config.rounds = 3  # type: ignore[misc]
