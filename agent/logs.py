"""Logging, set up once per process: structlog for our code, stdlib logging routed through it.

JSON lines when stderr is not a terminal (journald, files), readable colours on a
terminal. Every line carries the line id, and values that look like secrets are
masked whatever the call site passes.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from pydantic import SecretStr

SECRET_KEY = re.compile(r"pass(word)?|secret|token|credential|api_?key", re.IGNORECASE)
SECRET_IN_URL = re.compile(r"(://[^:/@\s]*:)([^@\s]+)(@)")
MASK = "********"


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, str):
        return SECRET_IN_URL.sub(rf"\1{MASK}\3", value)
    if isinstance(value, dict):
        return {k: MASK if SECRET_KEY.search(str(k)) and v else _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


def mask_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: no password reaches a log line, whatever was passed."""
    for key in list(event):
        if SECRET_KEY.search(key) and event[key]:
            event[key] = MASK
        else:
            event[key] = _mask(event[key])
    return event


OUR_LOGGERS = ("agent", "model", "trainer", "bench", "deploy", "genclip")


class ThirdPartyInfoAsDebug(logging.Filter):
    """Other packages' INFO lines (open_clip's "Parsing model identifier...", sent through the root
    logger) are DEBUG for us: shown only at level DEBUG, so every verb starts with our own lines."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        # structlog's records carry their event dict as `msg`; plain stdlib records come from libraries
        ours = isinstance(record.msg, dict) or record.name.split(".", 1)[0] in OUR_LOGGERS
        if ours or record.levelno != logging.INFO:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.level <= logging.DEBUG


def configure_logging(line_id: str, level: str = "INFO", fmt: str = "auto", stream: Any = None) -> None:
    """Route structlog and stdlib logging to one stream, one format, tagged with the line id."""
    stream = stream if stream is not None else sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not getattr(stream, "isatty", lambda: False)())

    def add_line(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("line", line_id)
        return event

    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_line,
        mask_secrets,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([structlog.processors.format_exc_info] if as_json else []),
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ThirdPartyInfoAsDebug(logging.getLevelName(level)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("PIL", "urllib3", "httpx", "huggingface_hub", "matplotlib", "onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    quiet_opencv(level)


def quiet_opencv(level: str) -> None:
    """OpenCV writes its own plain-text warnings to stderr ("[ WARN:0@25.8] global grfmt_png.cpp ..."), which
    break a JSON log stream; every problem they describe (a file that will not decode, a camera that will not
    open) is logged by us with its camera or file. So OpenCV speaks only at DEBUG."""
    import cv2

    cv_log = cv2.utils.logging
    cv_log.setLogLevel(cv_log.LOG_LEVEL_WARNING if level == "DEBUG" else cv_log.LOG_LEVEL_SILENT)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
