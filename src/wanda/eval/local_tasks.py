"""The zero-shot tasks defined over local files: the harness's own task configs with their data in a folder.

``wanda/eval/tasks/*.yaml`` holds, for each task, the harness's config for it (same prompt, choices, metrics) with
``dataset_path`` a local json/jsonl/text file; where the file's layout differs from the hub's, its
``process_docs`` converts the rows (``wanda/eval/tasks/convert.py``). Offline, this is how the paper's seven
tasks are evaluated with the harness's own definitions.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

from ..errors import WandaError

__all__ = ["HUB", "TASKS_DIR", "local_task_config", "local_task_files", "local_task_names", "resolve_data_dir"]

log = logging.getLogger(__name__)

#: Local task configs shipped with wanda (package data), one ``<task>.yaml`` each.
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
#: Values of ``data_dir`` / ``--zero_shot_data`` that mean "use the hub even if $WANDA_DATA_DIR is set".
HUB = ("hub", "none")


def resolve_data_dir(value: str | Path | None) -> Path | None:
    """``--zero_shot_data``: a folder; 'hub'/'none' for the hub; unset: ``$WANDA_DATA_DIR/zeroshot`` if that
    folder exists, else the hub."""
    if value is None:
        env = os.environ.get("WANDA_DATA_DIR")
        if env and (Path(env) / "zeroshot").is_dir():
            return Path(env) / "zeroshot"
        return None
    if str(value).lower() in HUB:
        return None
    return Path(value).expanduser()


def local_task_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))


def _function(loader, node):
    """``!function module.name``: ``convert.x`` is wanda's converter module; other dotted paths are imported
    (e.g. the harness's own winogrande prompt functions)."""
    qualified = loader.construct_scalar(node)
    module, _, name = qualified.rpartition(".")
    if module == "convert":
        module = f"{__package__}.tasks.convert"
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise WandaError(
            f"task config function {qualified!r} could not be imported ({exc}); is lm-eval "
            "installed in a version that has it? (pip install 'wanda[zeroshot]')"
        ) from exc


def _read_yaml(path: Path) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", _function)
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=Loader)  # noqa: S506 - SafeLoader plus one constructor


def local_task_files(name: str, data_dir: Path) -> dict[str, str]:
    """Split -> the file of local task ``name`` under ``data_dir``; a missing one is refused in one line."""
    raw = _read_yaml(TASKS_DIR / f"{name}.yaml")
    files = {}
    for split, relative in raw["dataset_kwargs"]["data_files"].items():
        path = (data_dir / relative).resolve()
        if not path.is_file():
            raise WandaError(
                f"task {name}: {path} is missing; --zero_shot_data must hold {relative} "
                "(see shared/data/SOURCES.md), or pass --zero_shot_data hub"
            )
        files[split] = str(path)
    return files


def local_task_config(name: str, data_dir: str | Path, num_fewshot: int = 0) -> dict:
    """The harness task config (a dict for ``TaskManager.load``) of local task ``name`` over ``data_dir``."""
    if name not in local_task_names():
        raise WandaError(f"no local definition of task {name!r}; local tasks: {', '.join(local_task_names())}")
    config = _read_yaml(TASKS_DIR / f"{name}.yaml")
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": local_task_files(name, Path(data_dir))}
    if num_fewshot > 0:
        # The local copies hold only the evaluation split, so examples are drawn from it. The harness leaves the
        # document being evaluated out of its own examples only when the few-shot split is the test split.
        split = config.get("test_split") or config.get("validation_split")
        config.update(test_split=split, validation_split=None, fewshot_split=split)
        log.warning(
            "%s: %d-shot examples come from the evaluation file itself (no training split offline; the "
            "document being evaluated is left out), so scores differ from the hub version's",
            name,
            num_fewshot,
        )
    return config
