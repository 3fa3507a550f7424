"""Generated corrupt inputs: random bytes as calibration files, random damage to a model folder.

Whatever the bytes, reading them either works or raises ``WandaError`` (the one exception the command line
turns into a single ``error:`` line); any other exception would reach the user as a traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import save_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wanda import WandaError
from wanda.data import resolve_source
from wanda.models import load_model

QUICK = settings(
    max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)

#: Texts that look almost like the formats the readers expect, so that the fuzz gets past the first check.
_NEAR_MISSES = st.sampled_from(
    [
        '{"text": "a"}\n',
        '{"text": 1}\n',
        '{"text": null}\n',
        '[{"text": "b"}]',
        "{}\n",
        '{"text": "\\ud800"}\n',
        "\n",
        "\ufeff",
        "\x00",
        "\xe9",
        "PAR1",
        "w1 w2 w3\n",
        '"text"',
        "[",
        "]",
        "{",
        '{"other": "x"}\n',
        "1e999\n",
        "NaN\n",
    ]
)


@QUICK
@given(
    suffix=st.sampled_from([".txt", ".raw", ".json", ".jsonl", ".parquet"]),
    content=st.one_of(
        st.binary(max_size=200),
        st.lists(_NEAR_MISSES, max_size=6).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass")),
    ),
)
def test_any_bytes_as_a_text_source(tmp_path_factory, suffix, content):
    path = tmp_path_factory.mktemp("source") / f"data{suffix}"
    path.write_bytes(content)
    try:
        source = resolve_source(str(path), "calibration")
    except WandaError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert any(doc.strip() for doc in source.documents)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("fuzz-model"), "llama")


DAMAGE = ["truncate", "flip", "replace"]
FILES = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]


@QUICK
@given(
    file=st.sampled_from(FILES),
    damage=st.sampled_from(DAMAGE),
    where=st.floats(0, 1),
    byte=st.integers(0, 255),
    text=st.text(max_size=40),
)
def test_any_damage_to_a_model_folder(tiny, tmp_path_factory, file, damage, where, byte, text):
    folder = Path(shutil.copytree(tiny, tmp_path_factory.mktemp("damaged") / "model"))
    path = folder / file
    data = bytearray(path.read_bytes())
    position = min(int(where * len(data)), len(data) - 1)
    if damage == "truncate":
        data = data[:position]
    elif damage == "flip":
        data[position] = byte
    else:
        data = bytearray(text.encode("utf-8"))
    path.write_bytes(bytes(data))
    try:
        load_model(str(folder), device="cpu")
    except WandaError as exc:
        assert "\n" not in str(exc)
