"""The library's logger: named ``hf_pmi``, with the same verbosity as `transformers`.

`transformers.utils.logging` owns the verbosity of a run: `TrainingArguments.log_level` (and
``TRANSFORMERS_VERBOSITY``) set it when a `Trainer` is built. The ``hf_pmi`` logger follows it:
`get_logger` gives it a stderr handler formatted like transformers' own (``[hf_pmi] message``)
and the level transformers has now, and `ContinualTrainer` re-applies the run's process log level
(`set_verbosity`), so ``log_level="info"`` shows messages such as "Resumed from ...".

Records still propagate to the root logger, so `logging.basicConfig` users and pytest's
``caplog`` see them too.

Example:
    >>> from hf_pmi.log import get_logger, set_verbosity
    >>> logger = get_logger()
    >>> set_verbosity("info")
    >>> logger.getEffectiveLevel() == 20
    True
    >>> set_verbosity("warning")
"""

from __future__ import annotations

import logging
import sys
import threading

NAME = "hf_pmi"
_handler: logging.Handler | None = None
_lock = threading.Lock()


def _configure() -> logging.Logger:
    global _handler
    logger = logging.getLogger(NAME)
    with _lock:
        if _handler is None:
            from transformers.utils import logging as hf_logging

            _handler = logging.StreamHandler(sys.stderr)
            _handler.setFormatter(logging.Formatter(f"[{NAME}] %(message)s"))
            logger.addHandler(_handler)
            if logger.level == logging.NOTSET:  # nobody chose a level yet: transformers' current one
                logger.setLevel(hf_logging.get_verbosity())
    return logger


def get_logger() -> logging.Logger:
    """The ``hf_pmi`` logger, configured once (see the module docstring)."""
    return _configure()


def set_verbosity(level: int | str) -> None:
    """Set the ``hf_pmi`` level: an int from `logging`, or a name ("debug", "info", "warning", ...)."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError(f"Unknown log level {level!r}; use debug, info, warning, error or critical.")
    _configure().setLevel(level)
