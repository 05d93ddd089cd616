"""mptrec.logs: the one logging set-up (rank filter, current stderr, doctest)."""

from __future__ import annotations

import contextlib
import doctest
import io

import pytest

from mptrec import logs


def test_doctest() -> None:
    result = doctest.testmod(logs)
    assert result.attempted > 0 and result.failed == 0, result


@pytest.mark.parametrize(("rank", "shown"), [("0", ["info", "warning"]), ("1", ["warning"])])
def test_info_on_rank_0_only_warnings_everywhere(monkeypatch: pytest.MonkeyPatch, rank: str,
                                                  shown: list[str]) -> None:
    monkeypatch.setenv("RANK", rank)
    log = logs.get_logger("mptrec.test_logs")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        log.info("info")
        log.warning("warning")
    assert err.getvalue().splitlines() == shown


def test_one_handler_however_often_it_is_imported() -> None:
    import importlib
    import logging

    importlib.reload(logs)
    assert [h.get_name() for h in logging.getLogger("mptrec").handlers].count("mptrec") == 1
    assert logs.get_logger("pipeline.x").name == "mptrec.pipeline.x"
