"""``quiet_library_warnings`` drops exactly the library messages it lists (by message and category, or
logger and message) and nothing a user can act on."""

from __future__ import annotations

import logging
import warnings

import pytest

from v2pe_megatron.runtime.quiet import SILENCED, SILENCED_LOGS, quiet_library_warnings


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "INFO")  # restored afterwards
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_warnings()
        yield seen


@pytest.mark.parametrize("pattern, category", SILENCED)
def test_each_listed_warning_is_silenced_and_only_in_its_category(quiet, pattern, category):
    msg = pattern.replace("\\", "") + " (as the library words it)"
    warnings.warn(msg, category)
    assert not quiet
    other = DeprecationWarning if category is not DeprecationWarning else UserWarning
    warnings.warn(msg, other)
    assert len(quiet) == 1


def test_other_warnings_still_show(quiet):
    warnings.warn("data.overlong=truncate cut 3 samples", UserWarning)
    warnings.warn("Transformer Engine 2.9 does not support a2a with thd", UserWarning)
    assert len(quiet) == 2


@pytest.mark.parametrize("name, pattern", SILENCED_LOGS)
def test_each_listed_log_line_is_dropped_and_others_from_that_logger_kept(quiet, caplog, name, pattern):
    caplog.set_level(logging.INFO)
    logger = logging.getLogger(name)
    logger.warning(pattern.replace("\\", "") + " ...")
    logger.warning("something the user should see")
    assert [r.getMessage() for r in caplog.records if r.name == name] == ["something the user should see"]


def test_idempotent():
    quiet_library_warnings()
    quiet_library_warnings()
    for name, _ in SILENCED_LOGS:
        assert len(logging.getLogger(name).filters) == len([n for n, _ in SILENCED_LOGS if n == name])
