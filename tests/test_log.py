"""Structured logging: JSON lines with fields, and the text form."""
from __future__ import annotations

import io
import json
import logging

import pytest

from streamfn.log import configure_logging


def test_json_lines_carry_the_fields_first():
    stream = io.StringIO()
    configure_logging(log_format="json", level="debug", stream=stream)
    logging.getLogger("streamfn.test").info("lane opened", extra={"offset": 7, "pipeline": "p", "lane": "t[0]"})
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "lane opened" and entry["level"] == "info" and entry["logger"] == "streamfn.test"
    assert list(entry)[4:] == ["pipeline", "lane", "offset"] and entry["offset"] == 7
    assert entry["time"].endswith("+00:00")


def test_text_form_and_levels():
    stream = io.StringIO()
    configure_logging(log_format="text", level="warning", stream=stream)
    log = logging.getLogger("streamfn.test")
    log.info("hidden")
    log.warning("dead letters written", extra={"count": 3})
    line = stream.getvalue().strip()
    assert "hidden" not in line and line.endswith("warning dead letters written  count=3")


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="log format"):
        configure_logging(log_format="xml")
    with pytest.raises(ValueError, match="log level"):
        configure_logging(level="loud")
