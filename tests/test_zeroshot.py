"""Zero-shot evaluation with lm-eval: local task definitions, converters, and runs on a tiny model.

* The local tasks build exactly the requests (context, continuation) of the harness's built-in tasks for the
  same documents: the built-in configs are read from the installed harness and pointed at small hub-format
  files written here; the local ones at the same documents in the local files' layouts.
* Each converter against the real local files (skipped visibly without ../shared/data).
* The harness on a pruned tiny model over the first few items of each of the seven local files: every task
  loads, accuracies lie in [0, 1], item counts equal --limit, and the zeros have not moved.
"""

from __future__ import annotations

import bz2
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, save_tiny

pytest.importorskip("lm_eval")

from wanda.errors import WandaError  # noqa: E402
from wanda.eval.tasks import convert  # noqa: E402
from wanda.eval.zeroshot import (  # noqa: E402
    PAPER_TASKS,
    ZeroShotSettings,
    evaluate_zero_shot,
    linear_zero_counts,
    local_task_config,
    local_task_names,
    run_zero_shot,
)
from wanda.pruning.prune import model_sparsity, prune  # noqa: E402
from wanda.pruning.prune_settings import PruneSettings  # noqa: E402

ZEROSHOT = SHARED_DATA / "zeroshot"
needs_shared = pytest.mark.skipif(not ZEROSHOT.is_dir(), reason=f"local task files not found at {ZEROSHOT}")

# ---------------------------------------------------------------------------------------------- fixtures
# The same documents twice: as they sit in the local files (SOURCES.md) and as the hub serves them (the
# harness's own datasets). Written by hand, not by the converters under test.
ARC_LOCAL = [
    {
        "id": "Q1",
        "question": {
            "stem": "Which gas do plants take in?",
            "choices": [
                {"text": "oxygen", "label": "A"},
                {"text": "carbon dioxide", "label": "B"},
                {"text": "helium", "label": "C"},
                {"text": "neon", "label": "D"},
            ],
        },
        "answerKey": "B",
    },
    {
        "id": "Q2",
        "question": {
            "stem": "What melts ice fastest?",
            "choices": [
                {"text": "salt", "label": "1"},
                {"text": "sand", "label": "2"},
                {"text": "sugar", "label": "3"},
            ],
        },
        "answerKey": "1",
    },
    {
        "id": "Q3",
        "question": {
            "stem": "Pick the mammal.",
            "choices": [
                {"text": "shark", "label": "A"},
                {"text": "whale", "label": "B"},
                {"text": "trout", "label": "C"},
                {"text": "eel", "label": "D"},
                {"text": "squid", "label": "E"},
            ],
        },
        "answerKey": "B",
    },
]
ARC_HUB = [
    {
        "id": "Q1",
        "question": "Which gas do plants take in?",
        "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    },
    {
        "id": "Q2",
        "question": "What melts ice fastest?",
        "choices": {"text": ["salt", "sand", "sugar"], "label": ["1", "2", "3"]},
        "answerKey": "1",
    },
    {
        "id": "Q3",
        "question": "Pick the mammal.",
        "choices": {"text": ["shark", "whale", "trout", "eel", "squid"], "label": ["A", "B", "C", "D", "E"]},
        "answerKey": "B",
    },
]
HELLASWAG_HUB = [
    {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter "
        "clothes smiles.",
        "ctx_b": "then",
        "ctx": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes "
        "smiles. then",
        "endings": [
            ", the man adds wax to the windshield and cuts it.",
            ", a person board a ski lift.",
            ", the man puts on a christmas coat.",
            ", the man continues removing the snow on his car.",
        ],
        "source_id": "activitynet~v_-1IBHYS3L-Y",
        "split": "val",
        "split_type": "indomain",
        "label": "3",
    },
    {
        "ind": 9,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to clean a glass stovetop [title] Wipe off loose debris. [step] Use a damp cloth.",
        "ctx_b": "",
        "ctx": "[header] How to clean a glass stovetop [title] Wipe off loose debris. [step] Use a damp cloth.",
        "endings": [
            "Let it dry. [substeps] Use a towel.",
            "Spray cleaner on it. [title] Scrub the top.",
            "Pour water. Then dry.",
            "Leave it.",
        ],
        "source_id": "wikihow~1",
        "split": "val",
        "split_type": "zeroshot",
        "label": "0",
    },
]
# llama.cpp's text format of the two items above (tags removed by its converter's rules, by hand)
HELLASWAG_TEXT = [
    "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman "
    "wearing winter clothes smiles. then",
    "3",
    ", the man adds wax to the windshield and cuts it.",
    ", a person board a ski lift.",
    ", the man puts on a christmas coat.",
    ", the man continues removing the snow on his car.",
    "Home and Garden: How to clean a glass stovetop. Wipe off loose debris. Use a damp cloth.",
    "0",
    "Let it dry. Use a towel.",
    "Spray cleaner on it.. Scrub the top.",
    "Pour water. Then dry.",
    "Leave it.",
]

CASES = {
    # task: (harness folder, local relative path, local rows, hub split, hub rows)
    "boolq": (
        "super_glue/boolq",
        "boolq/val.jsonl",
        [
            {"question": "is the sky blue", "passage": "Sky -- The sky is blue by day.", "idx": 0, "label": "true"},
            {"question": "do fish fly", "passage": "Fish -- Fish swim.", "idx": 1, "label": "false"},
        ],
        "validation",
        [
            {"question": "is the sky blue", "passage": "Sky -- The sky is blue by day.", "idx": 0, "label": 1},
            {"question": "do fish fly", "passage": "Fish -- Fish swim.", "idx": 1, "label": 0},
        ],
    ),
    "rte": (
        "glue/rte",
        "rte/val.jsonl",
        [
            {"premise": "A cat sat on the mat.", "hypothesis": "A cat sat.", "label": "entailment", "idx": 0},
            {"premise": "It rained.", "hypothesis": "It was dry.", "label": "not_entailment", "idx": 1},
        ],
        "validation",
        [
            {"sentence1": "A cat sat on the mat.", "sentence2": "A cat sat.", "label": 0, "idx": 0},
            {"sentence1": "It rained.", "sentence2": "It was dry.", "label": 1, "idx": 1},
        ],
    ),
    "winogrande": (
        "winogrande",
        "winogrande/dev.jsonl",
        [
            {
                "qID": "a-1",
                "sentence": "Sarah beat Maria so _ was happy.",
                "option1": "Sarah",
                "option2": "Maria",
                "answer": "1",
            },
            {
                "qID": "a-2",
                "sentence": "The cup fell off the shelf because the _ was round.",
                "option1": "cup",
                "option2": "shelf",
                "answer": "1",
            },
        ],
        "validation",
        [
            {"sentence": "Sarah beat Maria so _ was happy.", "option1": "Sarah", "option2": "Maria", "answer": "1"},
            {
                "sentence": "The cup fell off the shelf because the _ was round.",
                "option1": "cup",
                "option2": "shelf",
                "answer": "1",
            },
        ],
    ),
    "arc_easy": ("arc", "arc_easy/ARC-Easy-Test.jsonl", ARC_LOCAL, "test", ARC_HUB),
    "arc_challenge": ("arc", "arc_challenge/ARC-Challenge-Test.jsonl", ARC_LOCAL, "test", ARC_HUB),
    "openbookqa": (
        "openbookqa",
        "openbookqa/test.jsonl",
        [
            {
                "id": "7-1",
                "question": {
                    "stem": "The sun is responsible for",
                    "choices": [
                        {"text": "puppies learning tricks", "label": "A"},
                        {"text": "plants sprouting", "label": "B"},
                        {"text": "rocks", "label": "C"},
                        {"text": "stars", "label": "D"},
                    ],
                },
                "answerKey": "B",
            }
        ],
        "test",
        [
            {
                "id": "7-1",
                "question_stem": "The sun is responsible for",
                "choices": {
                    "text": ["puppies learning tricks", "plants sprouting", "rocks", "stars"],
                    "label": ["A", "B", "C", "D"],
                },
                "answerKey": "B",
            }
        ],
    ),
    "hellaswag": ("hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", HELLASWAG_TEXT, "validation", HELLASWAG_HUB),
}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_local(folder: Path, task: str) -> None:
    _, relative, rows, _, _ = CASES[task]
    if relative.endswith(".bz2"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        with bz2.open(folder / relative, "wt", encoding="utf-8") as handle:
            handle.write("\n".join(rows) + "\n")
    else:
        _write_jsonl(folder / relative, rows)


@pytest.fixture
def local_data(tmp_path) -> Path:
    """A folder in the layout of shared/data/zeroshot holding the fixture documents of every task."""
    folder = tmp_path / "zeroshot"
    for task in CASES:
        _write_local(folder, task)
    return folder


def _builtin_config(task: str, hub_file: Path, split: str, cache: Path) -> dict:
    """The installed harness's own config of ``task``, reading ``hub_file`` (hub layout) instead of the hub."""
    import lm_eval.tasks
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = Path(lm_eval.tasks.__file__).parent / CASES[task][0]
    index = TaskIndex.build([folder])
    assert task in index, f"lm-eval {lm_eval.__version__} has no built-in task {task} under {folder}"
    config = load_yaml(index[task].yaml_path, resolve_func=True)
    for key in ("training_split", "validation_split", "test_split"):
        config[key] = None
    config.update(
        {
            f"{'test' if split == 'test' else 'validation'}_split": split,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(hub_file)}, "cache_dir": str(cache)},
        }
    )
    return config


def _requests(config: dict) -> list[tuple]:
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_defaults=False).load([config])["tasks"][config["task"]]
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return sorted((i.doc_id, i.idx, i.args) for i in task.instances)


# ------------------------------------------------------------------------------- requests equal the harness
@pytest.mark.parametrize("task", list(CASES))
def test_local_task_builds_the_harness_requests(task, local_data, tmp_path):
    _, _, _, split, hub_rows = CASES[task]
    builtin = _builtin_config(
        task, _write_jsonl(tmp_path / "hub" / f"{task}.jsonl", hub_rows), split, tmp_path / "cache"
    )
    local = local_task_config(task, local_data)
    local["dataset_kwargs"]["cache_dir"] = str(tmp_path / "cache")
    expected, got = _requests(builtin), _requests(local)
    choices = [len(row["choices"]["text"]) if "choices" in row else len(row.get("endings", "ab")) for row in hub_rows]
    assert len(got) == sum(choices)  # one loglikelihood request per answer choice
    assert got == expected
    # the same prompt, choices and metrics as the built-in config, read from the harness
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list"):
        if not callable(builtin.get(key)):
            assert local.get(key) == builtin.get(key), key


def test_every_paper_task_has_a_local_definition():
    assert set(PAPER_TASKS) <= set(local_task_names())
    assert set(CASES) == set(PAPER_TASKS)


def test_hellaswag_ending_that_started_with_a_tag_differs_only_by_a_leading_space():
    # A known limit of the text format: "[substeps] Use ..." loses the space the harness keeps.
    hub = dict(HELLASWAG_HUB[1], endings=["[substeps] Use a towel.", "b.", "c.", "d."])
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    harness = process_docs(datasets.Dataset.from_list([hub]))[0]
    local = convert.hellaswag_records([HELLASWAG_TEXT[6], "0", "Use a towel.", "b.", "c.", "d."])[0]
    assert local["query"] == harness["query"]
    assert harness["choices"][0] == " Use a towel." and local["choices"][0] == "Use a towel."


# ----------------------------------------------------------------------------------- converters, row level
def test_boolq_record_labels():
    assert convert.boolq_record({"question": "q", "passage": "p", "idx": 3, "label": "true"})["label"] == 1
    assert convert.boolq_record({"question": "q", "passage": "p", "idx": 3, "label": "false"})["label"] == 0
    assert convert.boolq_record({"question": "q", "passage": "p", "idx": 3, "label": False})["label"] == 0
    with pytest.raises(ValueError, match="maybe"):
        convert.boolq_record({"question": "q", "passage": "p", "idx": 3, "label": "maybe"})


def test_rte_record_fields_and_labels():
    row = convert.rte_record({"premise": "a", "hypothesis": "b", "label": "not_entailment", "idx": 5})
    assert row == {"sentence1": "a", "sentence2": "b", "label": 1, "idx": 5}
    with pytest.raises(ValueError):
        convert.rte_record({"premise": "a", "hypothesis": "b", "label": "contradiction", "idx": 5})


def test_arc_and_openbookqa_records_flatten_choices():
    assert [convert.arc_record(r) for r in ARC_LOCAL] == ARC_HUB
    row = CASES["openbookqa"][2][0]
    assert convert.openbookqa_record(row) == CASES["openbookqa"][4][0]


def test_hellaswag_records_reject_a_broken_file():
    with pytest.raises(ValueError, match="multiple of 6"):
        convert.hellaswag_records(HELLASWAG_TEXT[:5])
    with pytest.raises(ValueError, match="gold label"):
        convert.hellaswag_records([HELLASWAG_TEXT[0], "7"] + HELLASWAG_TEXT[2:6])


# ------------------------------------------------------------------------------ converters on the real files
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@needs_shared
def test_boolq_file():
    rows = [convert.boolq_record(r) for r in _jsonl(ZEROSHOT / "boolq/val.jsonl")]
    assert len(rows) == 3270 and Counter(r["label"] for r in rows) == {1: 2033, 0: 1237}


@needs_shared
def test_rte_file():
    rows = [convert.rte_record(r) for r in _jsonl(ZEROSHOT / "rte/val.jsonl")]
    assert len(rows) == 277 and Counter(r["label"] for r in rows) == {0: 146, 1: 131}


@needs_shared
@pytest.mark.parametrize(
    "name, count, numeric",
    [("arc_easy/ARC-Easy-Test.jsonl", 2376, 97), ("arc_challenge/ARC-Challenge-Test.jsonl", 1172, 22)],
)
def test_arc_files(name, count, numeric):
    rows = [convert.arc_record(r) for r in _jsonl(ZEROSHOT / name)]
    assert len(rows) == count
    assert all(r["answerKey"] in r["choices"]["label"] for r in rows)
    assert sum(r["choices"]["label"][0] == "1" for r in rows) == numeric
    assert {len(r["choices"]["text"]) for r in rows} == {3, 4, 5}


@needs_shared
def test_openbookqa_file():
    rows = [convert.openbookqa_record(r) for r in _jsonl(ZEROSHOT / "openbookqa/test.jsonl")]
    assert len(rows) == 500 and Counter(r["answerKey"] for r in rows) == {"A": 138, "B": 126, "C": 132, "D": 104}
    assert all(r["choices"]["label"] == ["A", "B", "C", "D"] for r in rows)


@needs_shared
def test_winogrande_file_has_the_hub_fields():
    rows = _jsonl(ZEROSHOT / "winogrande/dev.jsonl")
    labels = (ZEROSHOT / "winogrande/dev-labels.lst").read_text().split()
    assert len(rows) == 1267 and [r["answer"] for r in rows] == labels
    assert all(r["sentence"].count("_") == 1 and {"option1", "option2"} <= set(r) for r in rows)


@needs_shared
def test_hellaswag_file_matches_the_harness_on_the_original_schema_subset():
    """Against the 1000 items kept in the original (hub) schema: every query and label equal the harness's;
    choices equal it except a leading space where the original ending started with a tag (59 items)."""
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    with bz2.open(ZEROSHOT / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as handle:
        docs = convert.hellaswag_records(handle.read().splitlines())
    assert len(docs) == 10042
    assert Counter(d["gold"] for d in docs) == {0: 2515, 1: 2485, 2: 2584, 3: 2458}
    subset = _jsonl(ZEROSHOT / "hellaswag/subset_1000_original_schema/hellaswag.jsonl")
    harness = process_docs(datasets.Dataset.from_list([dict(r, label=str(r["label"])) for r in subset]))
    by_query: dict[str, list[dict]] = {}
    for doc in docs:
        by_query.setdefault(doc["query"], []).append(doc)
    exact = spaced = 0
    for want in harness:
        candidates = [
            d
            for d in by_query.get(want["query"], [])
            if d["label"] == want["label"] and [c.strip() for c in d["choices"]] == [c.strip() for c in want["choices"]]
        ]
        assert candidates, f"no local item for harness query {want['query'][:80]!r}"
        if candidates[0]["choices"] == want["choices"]:
            exact += 1
        else:
            assert [
                " " + c if w.startswith(" ") else c for c, w in zip(candidates[0]["choices"], want["choices"])
            ] == want["choices"]
            spaced += 1
    assert (exact, spaced) == (941, 59)


# ----------------------------------------------------------------------------------------------- settings
def test_settings_validation(tmp_path):
    on = dict(eval_zero_shot=True)
    with pytest.raises(WandaError, match="--limit"):
        ZeroShotSettings(limit=0, **on)
    with pytest.raises(WandaError, match="--eval_batch_size"):
        ZeroShotSettings(eval_batch_size="0", **on)
    with pytest.raises(WandaError, match="not a folder"):
        ZeroShotSettings(zero_shot_data=str(tmp_path / "missing"), **on)
    with pytest.raises(WandaError, match="boolq/val.jsonl"):
        ZeroShotSettings(tasks="boolq", zero_shot_data=str(tmp_path), **on)
    with pytest.raises(WandaError, match="twice"):
        ZeroShotSettings(tasks="rte,rte", **on)
    with pytest.raises(WandaError, match="add --eval_zero_shot"):
        ZeroShotSettings(tasks="rte")


def test_settings_from_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDA_DATA_DIR", raising=False)
    s = ZeroShotSettings(eval_zero_shot=True, tasks="rte, boolq", limit=4, eval_batch_size="auto")
    assert s.task_names == ("rte", "boolq") and s.limit == 4 and s.batch_size == "auto" and s.data_dir is None
    assert ZeroShotSettings().task_names == PAPER_TASKS and ZeroShotSettings().batch_size == 8
    (tmp_path / "zeroshot").mkdir()
    monkeypatch.setenv("WANDA_DATA_DIR", str(tmp_path))
    assert ZeroShotSettings().data_dir == tmp_path / "zeroshot"
    assert ZeroShotSettings(eval_zero_shot=True, zero_shot_data="hub").data_dir is None
    with pytest.raises(WandaError, match="--eval_batch_size"):
        ZeroShotSettings(eval_batch_size="big")


def test_few_shot_from_the_local_file_leaves_the_document_out(local_data):
    config = local_task_config("arc_easy", local_data, num_fewshot=2)
    assert config["fewshot_split"] == config["test_split"] == "test" and config["validation_split"] is None
    config = local_task_config("boolq", local_data, num_fewshot=1)
    assert config["fewshot_split"] == config["test_split"] == "validation"


# -------------------------------------------------------------------------------------- runs on a tiny model
def _pruned_tiny(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prune(model, None, PruneSettings(prune_method="magnitude", sparsity_ratio=0.5), progress=False)
    return model, AutoTokenizer.from_pretrained(folder)


def test_zeros_that_move_are_reported(local_data, tmp_path, monkeypatch):
    import lm_eval

    model, tokenizer = _pruned_tiny(tmp_path)

    def meddle(model=None, **kwargs):
        model.model.model.layers[0].mlp.up_proj.weight.data.fill_(1.0)  # HFLM.model: the wrapped model
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", meddle)
    with pytest.raises(WandaError, match="changed the zeros"):
        evaluate_zero_shot(
            model, tokenizer, ZeroShotSettings(eval_zero_shot=True, tasks="rte", zero_shot_data=str(local_data))
        )


def test_auto_batch_size_is_refused_on_cpu(local_data, tmp_path):
    model, tokenizer = _pruned_tiny(tmp_path)
    with pytest.raises(WandaError, match="needs a GPU"):
        evaluate_zero_shot(
            model,
            tokenizer,
            ZeroShotSettings(eval_zero_shot=True, tasks="rte", eval_batch_size="auto", zero_shot_data=str(local_data)),
        )


@needs_shared
def test_seven_local_tasks_on_a_pruned_tiny_model(tmp_path, capsys):
    model, tokenizer = _pruned_tiny(tmp_path)
    sparsity = model_sparsity(model)
    zeros = linear_zero_counts(model)
    pad = tokenizer.pad_token
    limit = 3
    settings = ZeroShotSettings(eval_zero_shot=True, limit=limit, eval_batch_size="4", zero_shot_data=str(ZEROSHOT))
    result = run_zero_shot(model, tokenizer, settings, save=tmp_path / "out")

    assert set(result["metrics"]) == set(PAPER_TASKS)
    for task in PAPER_TASKS:
        assert result["samples"][task]["evaluated"] == limit
        assert "acc" in result["metrics"][task]
        for value in result["metrics"][task].values():
            assert 0.0 <= value <= 1.0
        assert result["sources"][task].startswith(str(ZEROSHOT.resolve()))
    assert {"acc", "acc_norm"} <= set(result["metrics"]["hellaswag"])
    assert model_sparsity(model) == sparsity and linear_zero_counts(model) == zeros
    assert result["zero_fraction_after"] == result["zero_fraction_before"] == pytest.approx(0.5, abs=0.01)
    assert tokenizer.pad_token == pad  # the harness changed its own copy only
    saved = json.loads((tmp_path / "out" / "zero_shot.json").read_text())
    assert saved["metrics"] == result["metrics"]
    table = capsys.readouterr().out
    assert "| task | metric | value | stderr | n |" in table and "| arc_easy | acc_norm |" in table
    with pytest.raises(WandaError, match="already exists"):
        run_zero_shot(model, tokenizer, settings, save=tmp_path / "out")
