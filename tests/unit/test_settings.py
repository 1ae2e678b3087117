"""Settings read from the environment: defaults, parsing, and refusals that name the variable."""

from __future__ import annotations

import pytest

from weft.settings import Settings, SettingsError


def test_publish_timeout_defaults_to_5_s_and_is_read_from_the_environment() -> None:
    assert Settings.from_env({}).publish_timeout_s == 5.0
    assert Settings.from_env({"WEFT_PUBLISH_TIMEOUT_S": "0.75"}).publish_timeout_s == 0.75


@pytest.mark.parametrize("raw", ["0", "-1", "soon"])
def test_a_publish_timeout_that_is_not_a_positive_number_is_refused_by_name(raw: str) -> None:
    with pytest.raises(SettingsError, match="WEFT_PUBLISH_TIMEOUT_S"):
        Settings.from_env({"WEFT_PUBLISH_TIMEOUT_S": raw})


@pytest.mark.parametrize("url", ["nats://agent:s3cret@127.0.0.1:4222", "nats://a:4222,tls://tok@b:4222"])
def test_an_agent_nats_url_with_credentials_is_refused(url: str) -> None:
    # It travels in the clear (a GitHub workflow input, a webhook body, a Job spec).
    with pytest.raises(SettingsError, match="WEFT_AGENT_NATS_URL must not hold credentials"):
        Settings.from_env({"WEFT_AGENT_NATS_URL": url})
    assert Settings.from_env({"WEFT_AGENT_NATS_URL": "nats://a:4222,nats://b:4222"}).agent_nats_url == (
        "nats://a:4222,nats://b:4222")


def test_snapshot_encoding_is_fork_by_default_and_names_its_choices() -> None:
    assert Settings.from_env({}).snapshot_encode == "fork"
    assert Settings.from_env({"WEFT_SNAPSHOT_ENCODE": "Loop"}).snapshot_encode == "loop"
    with pytest.raises(SettingsError, match="WEFT_SNAPSHOT_ENCODE must be one of fork, loop, got 'thread'"):
        Settings.from_env({"WEFT_SNAPSHOT_ENCODE": "thread"})
