"""One logging format for every stage."""
from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger("clipmill")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("CLIPMILL_LOG_LEVEL", "INFO"))
        root.propagate = False
    return root.getChild(name)


def progress_disabled() -> bool:
    """tqdm bars only on a terminal (and never under CI), so logs stay readable."""
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()
