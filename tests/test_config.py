"""One configuration: hashing.config.Config holds every knob, pyproject's [tool.flwr.app.config] lists
every one of them with its default, and a bad value is a one-line error naming the key and the fix."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from hashing.config import Config, failures_of
from hashing.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _flwr_config() -> dict:
    """The Config keys of [tool.flwr.app.config] (its [search] table is a search run's, tested below)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        table = dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    table.pop("search", None)
    return table


def test_pyproject_search_table_is_the_protocols_search_job():
    from flwr.common.config import flatten_dict

    from hashing.federated import protocol as P

    with open(ROOT / "pyproject.toml", "rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    flat = flatten_dict({"search": table["search"]})
    assert flat == P.JOB_DEFAULTS
    job, rest = P.split_search_job(flatten_dict(table))  # the defaults: no search, every other key for Config
    assert job is None and Config.from_dict(rest) == Config()


def test_pyproject_lists_every_key_of_the_config_and_no_other():
    listed = set(_flwr_config())
    keys = set(Config.keys())
    assert listed == keys, f"missing in pyproject: {sorted(keys - listed)}; not in Config: {sorted(listed - keys)}"


def test_pyproject_defaults_are_the_configs_defaults():
    cfg = Config.from_dict(_flwr_config(), source="pyproject.toml")  # the ServerApp reads it so under `flwr run`
    assert cfg == Config()


def test_every_key_round_trips_through_the_message_json():
    cfg = Config.from_dict({"bits": 32, "dp": "client", "dp-noise": 2.0, "domains": "invert, blur",
                            "inject-failures": "silo-1@2", "client-threads": 1})
    again = Config.from_json(cfg.to_json())
    assert again == cfg and again.domain_list == ("invert", "blur")
    assert Config.from_dict(cfg.to_dict()) == cfg  # kebab keys
    assert Config.from_dict(cfg.to_dict(kebab=False)) == cfg  # snake keys


@pytest.mark.parametrize("values, words", [
    ({"num-silo": 3}, ("unknown key 'num-silo'", "num-silos")),
    ({"bits": 12}, ("'bits'", "multiple of 8")),
    ({"bits": "sixteen"}, ("'bits'", "int")),
    ({"lr": 0}, ("'lr'", "> 0")),
    ({"lr": "nan"}, ("'lr'", "float")),
    ({"batch-size": 0}, ("'batch-size'", "at least 1")),
    ({"epochs": -1}, ("'epochs'", "at least 1")),
    ({"variant": "huge"}, ("'variant'", "small, large")),
    ({"partitioner": "banana"}, ("'partitioner'", "iid, dirichlet")),
    ({"domains": "none,sepia"}, ("'domains'", "sepia")),
    ({"feed-interval": 5}, ("'feed-interval'", "[0, 1]")),
    ({"inject-failures": "silo-1"}, ("'inject-failures'", "<silo>@<round>")),
    ({"dp": "client"}, ("'dp-noise'", "noise multiplier")),
    ({"trimmed-beta": 0.5}, ("'trimmed-beta'", "[0, 0.5)")),
])
def test_bad_values_are_one_line_errors_naming_the_key(values, words):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(values, source="scenario s.toml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("scenario s.toml: ")
    for w in words:
        assert w in msg, (w, msg)


def test_a_per_mode_key_is_named_with_its_prefix():
    with pytest.raises(ConfigError, match="'unsupervised-server-lr'"):
        Config.from_dict({"server-lr": -1.0}, source="s.toml", key_prefix="unsupervised-")


def test_canonical_spellings_and_views():
    cfg = Config.from_dict({"partitioner": " Domain ", "domains": ["Invert", "animal_mnist"], "num-silos": "3"})
    assert cfg.partitioner == "domain" and cfg.domains == "invert,animal-mnist" and cfg.num_silos == 3
    assert [cfg.domain_of(i) for i in range(3)] == ["invert", "animal-mnist", "invert"]
    assert Config(partitioner="domain").domain_of(2) == "blur" and Config().domain_of(2) == "none"
    assert Config().min_silo_size == 10 and Config(min_size=0).min_silo_size == 3


def test_the_kind_of_hash_function_and_its_options():
    assert Config().hasher_kind == "probe" and Config(mode="lora").hasher_kind == "lora"
    assert Config(dp="client", dp_noise=1.0).hasher_kind == "dp"  # any DP: the head whose statistics are released
    assert Config(dp="client", dp_noise=1.0).hasher_options(1280) == {"feature_dim": 1280, "bits": 64, "seed": 0,
                                                                      "dims": 256}
    assert Config(mode="lora").hasher_options(1280)["r"] == 16


def test_inject_failures_parses_silo_at_round():
    assert failures_of("silo-1@2, silo (blur)@3,silo-1@4") == {"silo-1": {2, 4}, "silo (blur)": {3}}
    assert failures_of("") == {}


def test_replace_checks_and_the_dataclass_is_frozen():
    with pytest.raises(ConfigError, match="'bits'"):
        Config().replace(bits=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().bits = 8  # type: ignore[misc]
