"""Configure log output once per daemon: structlog renders the stdlib `logging` records.

Library code only calls `logging.getLogger(__name__)` and passes context in `extra=`; this module
decides how lines look (JSON for machines, console on a TTY) and where they go (stderr, plus an
optional size-rotated file), following the seed review's §4.1 ask for leveled, structured logs.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys

import structlog

from fastsandbox.settings import LogSettings

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _renderer(fmt: str) -> structlog.types.Processor:
    if fmt == "console" or (fmt == "auto" and sys.stderr.isatty()):
        return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    return structlog.processors.JSONRenderer()


def configure(settings: LogSettings, *, component: str) -> None:
    """Route every stdlib log record through structlog; idempotent (replaces our handlers)."""
    level = _LEVELS.get(settings.level.lower())
    if level is None:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}")
    if settings.format not in {"json", "console", "auto"}:
        raise ValueError("log format must be json, console or auto")

    def add_component(
        _logger: object, _name: str, event: structlog.types.EventDict
    ) -> structlog.types.EventDict:
        event.setdefault("component", component)
        return event

    pre_chain: list[structlog.types.Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_component,
    ]

    def formatter(renderer: structlog.types.Processor) -> logging.Formatter:
        return structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=pre_chain,
        )

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_fsb", False):
            root.removeHandler(handler)
            handler.close()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter(_renderer(settings.format)))
    handlers: list[logging.Handler] = [stderr]
    if settings.file is not None:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            settings.file, maxBytes=settings.file_max_bytes, backupCount=settings.file_backups
        )
        rotating.setFormatter(formatter(structlog.processors.JSONRenderer()))
        handlers.append(rotating)
    for handler in handlers:
        handler._fsb = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # grpc and aiosqlite are chatty at debug; our own debug is what the user asked for.
    for noisy in ("grpc", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
