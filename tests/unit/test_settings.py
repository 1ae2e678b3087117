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
