"""Local task files -> the documents lm-eval's own task definitions see on the hub.

Each ``*_docs`` function is a task's ``process_docs``: it takes the ``datasets.Dataset`` read from the local
file and returns one whose rows have the hub version's fields (names, types, values), so that the task's
prompt templates can be the harness's own, unchanged. The row-level ``*_record`` functions are the
conversions themselves (pure, tested one task at a time); file layouts are described in the data folder's
SOURCES.md.

wanda imports this file as ``wanda.eval.tasks.convert``; lm-eval's own YAML loader, given these configs,
would load it by path (``!function convert.name`` next to the YAML), so it only uses absolute imports.
"""

from __future__ import annotations

__all__ = [
    "boolq_record",
    "rte_record",
    "arc_record",
    "openbookqa_record",
    "hellaswag_records",
    "boolq_docs",
    "rte_docs",
    "arc_docs",
    "openbookqa_docs",
    "hellaswag_docs",
    "HELLASWAG_LINES_PER_ITEM",
]

_BOOLQ_LABELS = {"false": 0, "true": 1}  # SuperGLUE jsonl: strings; hub super_glue/boolq: 0 = no, 1 = yes
_RTE_LABELS = {"entailment": 0, "not_entailment": 1}  # hub glue/rte ClassLabel order


def _lookup(table: dict, value, field: str, record: dict):
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"{field}={value!r} is not one of {sorted(table)} in record {record}") from None


def boolq_record(record: dict) -> dict:
    """SuperGLUE ``BoolQ/val.jsonl`` row -> hub ``super_glue/boolq`` row (``label`` "true"/"false" -> 1/0)."""
    label = record["label"]
    if isinstance(label, bool):  # tolerate copies that store real JSON booleans
        label = int(label)
    elif isinstance(label, str):
        label = _lookup(_BOOLQ_LABELS, label.strip().lower(), "label", record)
    return {"question": record["question"], "passage": record["passage"], "idx": record["idx"], "label": int(label)}


def rte_record(record: dict) -> dict:
    """SuperGLUE ``RTE/val.jsonl`` row -> hub ``glue/rte`` row (premise/hypothesis -> sentence1/sentence2,
    "entailment" -> 0, "not_entailment" -> 1)."""
    label = record["label"]
    if isinstance(label, str):
        label = _lookup(_RTE_LABELS, label.strip(), "label", record)
    return {
        "sentence1": record["premise"],
        "sentence2": record["hypothesis"],
        "label": int(label),
        "idx": record["idx"],
    }


def _choices(record: dict) -> dict:
    choices = record["question"]["choices"]
    return {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}


def arc_record(record: dict) -> dict:
    """ARC-V1 jsonl row (``question.stem``, ``question.choices`` list of {text, label}) -> hub
    ``allenai/ai2_arc`` row (``question`` string, ``choices`` {text: [...], label: [...]}).

    Labels are copied as they are (A-D, or 1-4 on some items; 3 to 5 choices), as on the hub."""
    return {
        "id": record["id"],
        "question": record["question"]["stem"],
        "choices": _choices(record),
        "answerKey": record["answerKey"],
    }


def openbookqa_record(record: dict) -> dict:
    """OpenBookQA ``Main/test.jsonl`` row -> hub ``allenai/openbookqa`` (main) row (``question_stem``)."""
    return {
        "id": record["id"],
        "question_stem": record["question"]["stem"],
        "choices": _choices(record),
        "answerKey": record["answerKey"],
    }


# ---------------------------------------------------------------------------------------------- HellaSwag
#: llama.cpp's HellaSwag text format: context, gold index, then the four endings.
HELLASWAG_LINES_PER_ITEM = 6


def _harness_preprocess():
    # The harness's own HellaSwag clean-up (strip, " [title]" -> ". ", drop [tags], collapse double spaces),
    # imported rather than copied so that the local task follows the harness if it ever changes.
    from lm_eval.tasks.hellaswag.utils import preprocess

    return preprocess


def _capitalize_last_sentence(text: str) -> str:
    """Upper-case the first character after the last ". " (the start of ``ctx_b``, which the harness capitalizes).

    The text file joined ``ctx_a + " " + ctx_b``; ``ctx_a`` ends with a full sentence, so ``ctx_b`` (when not
    empty) starts after the last ". ". Checked against the 1000 items with the original schema: the queries
    equal the harness's for all of them."""
    head, sep, tail = text.rpartition(". ")
    return head + sep + tail[:1].upper() + tail[1:]  # like str.capitalize on its first character only


def hellaswag_records(lines: list[str], first_index: int = 0) -> list[dict]:
    """Lines of ``hellaswag_val_full.txt`` (6 per item) -> the harness's processed HellaSwag documents.

    The harness builds ``query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` and
    ``choices = [preprocess(e) for e in endings]``; the text file holds ``activity_label: ctx`` and the endings
    after a similar clean-up. Known, unrecoverable difference: where an original ending *started* with a tag
    (``[title]``, ``[substeps]``, ... in about 6% of items, all WikiHow), the harness keeps one leading space
    (``" Sanitize the lids..."``) that the text file dropped; those choices are scored without it.
    """
    if len(lines) % HELLASWAG_LINES_PER_ITEM:
        raise ValueError(
            f"HellaSwag text has {len(lines)} lines, not a multiple of {HELLASWAG_LINES_PER_ITEM}: "
            "is this llama.cpp's hellaswag_val_full.txt format?"
        )
    preprocess = _harness_preprocess()
    docs = []
    for start in range(0, len(lines), HELLASWAG_LINES_PER_ITEM):
        context, gold, *endings = lines[start : start + HELLASWAG_LINES_PER_ITEM]
        if not gold.strip().isdigit() or not 0 <= int(gold) < len(endings):
            line = first_index * HELLASWAG_LINES_PER_ITEM + start + 2
            raise ValueError(f"HellaSwag line {line}: gold label {gold!r} is not 0..{len(endings) - 1}")
        activity_label, _, ctx = context.partition(": ")
        docs.append(
            {
                "ind": first_index + start // HELLASWAG_LINES_PER_ITEM,
                "activity_label": activity_label,
                "ctx": ctx,
                "endings": endings,
                "label": gold.strip(),  # a string, as on the hub (Rowan/hellaswag)
                "query": preprocess(_capitalize_last_sentence(context)),
                "choices": [preprocess(ending) for ending in endings],
                "gold": int(gold),
            }
        )
    return docs


# ------------------------------------------------------------------------------------- process_docs hooks
def boolq_docs(dataset):
    return dataset.map(boolq_record, remove_columns=dataset.column_names)


def rte_docs(dataset):
    return dataset.map(rte_record, remove_columns=dataset.column_names)


def arc_docs(dataset):
    return dataset.map(arc_record, remove_columns=dataset.column_names)


def openbookqa_docs(dataset):
    return dataset.map(openbookqa_record, remove_columns=dataset.column_names)


def hellaswag_docs(dataset):
    """``dataset``: the text file read by the ``text`` builder, one row per line (column ``text``).

    A batched map whose batches hold whole items, so that ``datasets`` caches the result like any other map
    (the harness asks for the documents several times)."""
    lines = HELLASWAG_LINES_PER_ITEM
    if dataset.num_rows % lines:
        raise ValueError(
            f"HellaSwag text has {dataset.num_rows} lines, not a multiple of {lines}: "
            "is this llama.cpp's hellaswag_val_full.txt format?"
        )

    def group(batch: dict, indices: list[int]) -> dict:
        docs = hellaswag_records(batch["text"], first_index=indices[0] // lines)
        return {key: [doc[key] for doc in docs] for key in docs[0]}

    return dataset.map(
        group, batched=True, batch_size=lines * 1000, with_indices=True, remove_columns=dataset.column_names
    )
