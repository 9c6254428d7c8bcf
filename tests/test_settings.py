"""Settings: one table behind the flags and the variables, all of it documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from trioagg.cli import main
from trioagg.core.errors import ConfigError
from trioagg.core.settings import Settings, env_name, flag_name, parse_duration, parse_size

SETTINGS_PAGE = (Path(__file__).parent.parent / "docs" / "settings.md").read_text()
NAMES = [field.name for field in dataclasses.fields(Settings)]


@pytest.mark.parametrize("name", NAMES)
def test_every_setting_is_documented_in_the_settings_page(name: str) -> None:
    assert f"`{flag_name(name)}`" in SETTINGS_PAGE
    assert f"`{env_name(name)}`" in SETTINGS_PAGE


@pytest.mark.parametrize("name", NAMES)
def test_every_setting_is_a_serve_flag(name: str) -> None:
    result = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert flag_name(name) in result.output
    assert env_name(name) in result.output


def test_serve_help_says_what_each_value_is() -> None:
    text = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).output
    for shown in (
        "--db PATH|URL",
        "--port PORT",
        "--batch-size N",
        "--enqueue-timeout DURATION",
        "--max-age DURATION|none",
        "--max-body SIZE",
        "--sync [full|normal]",
        "--bucket [1m|5m|15m|1h]",
        "--metrics-public [true|false]",
        "--loop-step-sampling FRACTION",
    ):
        assert shown in text
    assert " TEXT " not in text


def test_defaults() -> None:
    settings = Settings()
    assert (settings.db, settings.bucket, settings.sync) == ("trioagg.db", 3600, "full")
    assert settings.max_body == 10 * 1024 * 1024 and settings.max_batch == 10_000
    assert settings.max_future == 3600 and settings.max_age is None
    assert settings.dedup_window == 86400


def test_environment_variables() -> None:
    settings = Settings.from_env(
        {
            "TRIOAGG_DB": "/tmp/x.db",
            "TRIOAGG_BUCKET": "15m",
            "TRIOAGG_BATCH_SIZE": "500",
            "TRIOAGG_MAX_AGE": "7d",
            "TRIOAGG_SYNC": "NORMAL",
            "UNRELATED": "x",
        }
    )
    assert (settings.db, settings.bucket, settings.batch_size) == ("/tmp/x.db", 900, 500)
    assert settings.max_age == 7 * 86400 and settings.sync == "normal"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bucket", "2h", "is not a bucket width"),
        ("batch_size", "0", "at least 1"),
        ("port", "70000", "not a TCP port"),
        ("sync", "sometimes", "not one of"),
        ("max_body", "lots", "not a size"),
        ("max_future", "soon", "not a duration"),
        ("loop_step_sampling", "1.5", "not a fraction from 0 to 1"),
        ("loop_step_sampling", "nan", "not a fraction from 0 to 1"),
        ("read_cache_entries", "-1", "is not a whole number"),
    ],
)
def test_bad_values_name_flag_and_variable(name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{flag_name(name)} / {env_name(name)}")):
        Settings.from_text({name: text})
    with pytest.raises(ConfigError, match=message):
        Settings.from_text({name: text})


def test_fractions_and_cache_sizes() -> None:
    settings = Settings.from_text(
        {"loop_step_sampling": "0.25", "read_cache_entries": "0", "read_cache_ttl": "500ms"}
    )
    assert settings.loop_step_sampling == 0.25 and settings.read_cache_entries == 0
    assert settings.read_cache_ttl == 0.5


def test_unknown_setting_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.from_text({"colour": "red"})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("500ms", 0.5),
        ("15m", 900),
        ("1h", 3600),
        ("2d", 172800),
        ("1.5h", 5400),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("1024", 1024), ("10MiB", 10 * 1024**2), ("1kb", 1000), ("2GiB", 2 << 30)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_max_inflight_must_hold_the_largest_body() -> None:
    with pytest.raises(ConfigError, match=r"--max-inflight .* must be at least --max-body"):
        Settings.from_text({"max_inflight": "1MiB", "max_body": "2MiB"})
