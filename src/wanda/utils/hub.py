"""Whether the Hugging Face hub can be reached, found out once and quickly.

The ``datasets`` library retries an unreachable hub for about 25 seconds, printing a network error each time;
offline users should get one plain line instead. One TCP connection attempt with a short timeout answers
the question, and the answer is kept for the rest of the process.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

__all__ = ["hub_problem"]

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TIMEOUT_SECONDS = 3.0


@functools.lru_cache(maxsize=1)
def hub_problem() -> str | None:
    """None when the hub answers; otherwise why not, in a few words."""
    for name in _OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=_TIMEOUT_SECONDS).close()
    except OSError as exc:
        return f"{host}: {exc.strerror or type(exc).__name__}"
    return None
