"""Where a multiple-choice task comes from: :func:`load_task` turns a path to LLM-Adapters files
(:mod:`graphlora.examples`), a task name (its folder under a data dir, else the copy shipped with
graphlora, so a task name works offline), ``hub:<task>`` (the Hugging Face Hub, in the datasets'
original schemas) or ``synthetic`` (:mod:`graphlora.synthetic`) into train, validation and test
examples.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphlora.examples import (
    DataError,
    DatasetSplits,
    Example,
    first_line,
    format_prompt,
    load_llm_adapters_file,
    mc_example,
)
from graphlora.synthetic import make_synthetic_task

__all__ = [
    "DATA_DIR_ENV",
    "HUB_PREFIX",
    "SHIPPED_DATA_DIR",
    "TASKS",
    "DataError",
    "DatasetSplits",
    "Example",
    "TaskSpec",
    "canonical_task_name",
    "load_task",
]

DATA_DIR_ENV = "GRAPHLORA_DATA_DIR"
"""Environment variable naming a data dir: one folder per task (``ARC-Challenge/``, ``boolq/``...)
holding the LLM-Adapters ``train.json``/``test.json``."""

SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "task_data" / "commonsense"
"""The seven LLM-Adapters commonsense tasks shipped with graphlora (package data; sources and
licences in ``task_data/README.md``); used when no data dir is given."""

HUB_PREFIX = "hub:"
"""Task-name prefix that loads the Hugging Face Hub version of a task: ``hub:arc-challenge``."""

VALIDATION_FRACTION = 0.1
"""Share of the training file held out for validation (local files)."""
MAX_VALIDATION = 500
"""Cap on the held-out validation set (local files)."""
TEST_FRACTION = 0.3
"""Share kept for test when a task only has a test file and must be split three ways."""


# ----------------------------------------------------------------------------------------------
# Splitting


def _split_off(
    examples: Sequence[Example], n: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Returns ``(rest, held_out)`` with ``n`` examples held out at random; order is kept."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    rest = [ex for i, ex in enumerate(examples) if i not in held]
    held_out = [ex for i, ex in enumerate(examples) if i in held]
    return rest, held_out


def _validation_size(n: int) -> int:
    return min(MAX_VALIDATION, max(1, round(VALIDATION_FRACTION * n)))


def _load_local_task(location: Path, seed: int) -> DatasetSplits:
    """A task's splits from one ``.json`` file, or from a folder's ``test.json`` (and
    ``train.json`` when there is one)."""
    source = f"local:{location}"
    if location.is_file():
        train, test = None, load_llm_adapters_file(location)
    else:
        train_file = location / "train.json"
        train = load_llm_adapters_file(train_file) if train_file.is_file() else None
        test = load_llm_adapters_file(location / "test.json")
    if train is not None:
        train, validation = _split_off(train, _validation_size(len(train)), seed)
        return DatasetSplits(train, validation, test, source)
    # Only a test file: split it three ways (train / validation / test).
    if len(test) < 3:
        raise DataError(
            f"{source}: only {len(test)} examples and no train.json; at least 3 are needed to "
            "split into train/validation/test."
        )
    rest, test_part = _split_off(test, max(1, round(TEST_FRACTION * len(test))), seed)
    train_part, validation = _split_off(rest, _validation_size(len(test)), seed + 1)
    return DatasetSplits(train_part, validation, test_part, source)


# ----------------------------------------------------------------------------------------------
# Hugging Face Hub (original schemas)


def _from_arc_like(row: dict[str, Any], question_key: str) -> Example:
    # ai2_arc and openbookqa: choices {text: [...], label: ["A".."E"] or ["1".."4"]}, answerKey.
    choices = row["choices"]
    return mc_example(
        row[question_key], choices["text"], list(choices["label"]).index(row["answerKey"])
    )


def _from_boolq(row: dict[str, Any]) -> Example:
    # The LLM-Adapters BoolQ form (question only, no passage), so hub and local runs agree.
    question = row["question"].strip()
    if not question.endswith("?"):
        question += "?"
    instruction = (
        "Please answer the following question with true or false, question: "
        f"{question}\n\nAnswer format: true/false"
    )
    return Example(
        prompt=format_prompt(instruction),
        candidates=(" true", " false"),
        label=0 if row["answer"] else 1,
    )


def _from_siqa(row: dict[str, Any]) -> Example:
    question = f"{row['context'].strip()} {row['question'].strip()}"
    options = [row["answerA"], row["answerB"], row["answerC"]]
    return mc_example(question, options, int(row["label"]) - 1)


@dataclass(frozen=True)
class TaskSpec:
    """Where one named task lives.

    Attributes:
        name: Canonical name (``load_task`` accepts it and its aliases).
        local_dir: The task's folder under a data dir and under :data:`SHIPPED_DATA_DIR`.
        hub_path: Hub dataset id in its original schema, or None when there is no usable one.
        hub_config: Hub config name, if any.
        hub_test_split: Hub split used for test; ``"validation"`` means the test labels are
            not public and the validation split is halved into validation and test.
        aliases: Other accepted spellings (compared after lower-casing, ``_`` -> ``-``).
    """

    name: str
    local_dir: str
    hub_path: str | None = None
    hub_config: str | None = None
    hub_test_split: str = "test"
    aliases: tuple[str, ...] = ()


_HUB_CONVERTERS: dict[str, Callable[[dict[str, Any]], Example]] = {
    "arc-challenge": lambda row: _from_arc_like(row, "question"),
    "arc-easy": lambda row: _from_arc_like(row, "question"),
    "openbookqa": lambda row: _from_arc_like(row, "question_stem"),
    "boolq": _from_boolq,
    "siqa": _from_siqa,
}

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "arc-challenge",
            "ARC-Challenge",
            "allenai/ai2_arc",
            "ARC-Challenge",
            aliases=("arc-c", "arcc", "arc"),
        ),
        TaskSpec("arc-easy", "ARC-Easy", "allenai/ai2_arc", "ARC-Easy", aliases=("arc-e", "arce")),
        TaskSpec("boolq", "boolq", "google/boolq", None, "validation"),
        TaskSpec("openbookqa", "openbookqa", "allenai/openbookqa", "main", aliases=("obqa",)),
        TaskSpec(
            "siqa",
            "social_i_qa",
            "allenai/social_i_qa",
            None,
            "validation",
            aliases=("social-i-qa", "socialiqa", "social-iqa"),
        ),
        TaskSpec("piqa", "piqa"),
        TaskSpec("winogrande", "winogrande"),
        TaskSpec("synthetic", ""),
    )
}
"""Named tasks; ``piqa`` and ``winogrande`` have no ``hub:`` version, ``synthetic`` is generated."""

_ALIASES = {alias: spec.name for spec in TASKS.values() for alias in (spec.name, *spec.aliases)}


def canonical_task_name(name: str) -> str | None:
    """Returns the canonical task name for a name or alias, or None if it is not a task.

    Args:
        name: E.g. ``"ARC_Challenge"``, ``"obqa"``, ``"social_i_qa"``.
    """
    key = name.strip().lower().replace("_", "-")
    if key in _ALIASES:
        return _ALIASES[key]
    for spec in TASKS.values():  # the local folder names are accepted too
        if spec.local_dir and spec.local_dir.lower().replace("_", "-") == key:
            return spec.name
    return None


def _load_hub_dataset(path: str, config: str | None) -> Any:
    """Calls ``datasets.load_dataset`` (kept separate so tests can stand in for the Hub)."""
    import datasets

    return datasets.load_dataset(path, config)


def _load_hub_task(raw: str, task: str, seed: int) -> DatasetSplits:
    """Loads ``hub:<task>`` (``raw``): the named task's Hugging Face Hub version."""
    name = canonical_task_name(task)
    if name is None or TASKS[name].hub_path is None:
        what = (
            "is not a task"
            if name is None
            else "has no Hugging Face Hub version here (drop the 'hub:' prefix for local files)"
        )
        on_hub = [HUB_PREFIX + spec.name for spec in TASKS.values() if spec.hub_path is not None]
        raise DataError(f"{raw}: {task!r} {what}. Hub tasks: {', '.join(on_hub)}.")
    spec = TASKS[name]
    hub_name = spec.hub_path + (f" (config {spec.hub_config})" if spec.hub_config else "")
    try:
        dataset = _load_hub_dataset(spec.hub_path, spec.hub_config)
    except Exception as err:  # datasets raises ConnectionError, OSError, ValueError, ...
        raise DataError(
            f"Could not load task {HUB_PREFIX}{spec.name}: the Hugging Face Hub dataset "
            f"{hub_name} failed to load ({type(err).__name__}: {first_line(err)}). Check the "
            "network (and HF_HUB_OFFLINE), or drop the 'hub:' prefix to use the LLM-Adapters "
            "files shipped with graphlora (or those under --data-dir)."
        ) from err

    convert = _HUB_CONVERTERS[spec.name]

    def examples(split: str) -> list[Example]:
        out = []
        for i, row in enumerate(dataset[split]):
            try:
                out.append(convert(row))
            except (KeyError, ValueError, TypeError) as err:
                raise DataError(
                    f"hub:{hub_name}, split {split!r}, row {i}: unexpected row ({err!r}); the "
                    "dataset's schema may have changed. Use local files with --data-dir."
                ) from err
        return out

    train = examples("train")
    if spec.hub_test_split == "validation":
        # No public test labels: halve the validation split with a fixed seed.
        held = examples("validation")
        validation, test = _split_off(held, len(held) // 2, seed)
    else:
        validation, test = examples("validation"), examples(spec.hub_test_split)
    source = f"hub:{spec.hub_path}" + (f"/{spec.hub_config}" if spec.hub_config else "")
    return DatasetSplits(train, validation, test, source)


def _is_task_folder(path: Path) -> bool:
    return path.is_dir() and (path / "test.json").is_file()


def _data_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """Returns the data dir to read task folders from, and where that choice came from."""
    if data_dir is not None and os.fspath(data_dir):
        return Path(data_dir).expanduser(), "--data-dir"
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser(), DATA_DIR_ENV
    return SHIPPED_DATA_DIR, "the copy shipped with graphlora"


def load_task(
    name_or_path: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    split_seed: int = 0,
) -> DatasetSplits:
    """Loads a task's train, validation and test examples.

    Resolution order:

    1. ``name_or_path`` is an existing folder with ``test.json`` (and optionally ``train.json``)
       or an existing ``.json`` file: local LLM-Adapters files.
    2. ``name_or_path`` is a task name (see :data:`TASKS`; aliases such as ``arc_challenge``,
       ``obqa``, ``social_i_qa`` work); ``synthetic`` is generated. Its folder (``ARC-Challenge/``,
       ``boolq/``, ``social_i_qa/``...) is read from the first of: ``data_dir``, the
       ``GRAPHLORA_DATA_DIR`` environment variable, the copy shipped with graphlora
       (:data:`SHIPPED_DATA_DIR`). A data dir that is given must hold the task: there is no
       silent fall-back to another copy.
    3. ``hub:<task>`` (e.g. ``hub:arc-challenge``) is the one way to the Hugging Face Hub: the
       datasets in their original schemas and published splits. The splits differ from the
       LLM-Adapters files' (the Hub's own validation splits instead of 10% of train; BoolQ and
       SIQA test on half of their validation split), so accuracies are not comparable with runs
       on the local files. ``data_dir`` is ignored.

    Splits: local files carve validation out of ``train.json`` (10%, at most 500); a task with
    only ``test.json`` (siqa, piqa, winogrande) is split into train (60%), validation (10%, at
    most 500) and test (30%). On the Hub, validation and test splits are used as published;
    BoolQ and SIQA have no public test labels, so their validation split is halved. Every split
    is a deterministic function of ``split_seed``.

    Args:
        name_or_path: Task name, ``hub:<task>``, or path.
        data_dir: Folder holding one LLM-Adapters folder per task; overrides the environment.
        split_seed: Seed for the validation/test carving (and for the synthetic task).

    Returns:
        The task's :class:`DatasetSplits`.

    Raises:
        DataError: Unknown name, malformed files, a data dir without the task, or a failed
            Hub load.
    """
    raw = os.fspath(name_or_path)
    if raw.lower().startswith(HUB_PREFIX):
        return _load_hub_task(raw, raw[len(HUB_PREFIX) :], split_seed)
    path = Path(raw).expanduser()
    if path.is_file() or _is_task_folder(path):
        return _load_local_task(path, split_seed)
    if path.is_dir():
        raise DataError(
            f"{path}: folder has no test.json. A task folder holds test.json and optionally "
            "train.json in the LLM-Adapters format."
        )

    name = canonical_task_name(raw)
    if name is None:
        if raw.endswith(".json") or os.sep in raw or raw.startswith((".", "~")):
            raise DataError(f"{raw}: no such file or folder. Give an existing path or a task name.")
        raise DataError(
            f"Unknown task {raw!r}. Use one of {', '.join(TASKS)} (or hub:<task> for the "
            "Hugging Face Hub version), a folder holding train.json/test.json, or a .json file "
            "in the LLM-Adapters format."
        )
    if name == "synthetic":
        return make_synthetic_task(seed=split_seed)

    spec = TASKS[name]
    root, chosen_by = _data_dir(data_dir)
    tried: list[str] = []
    for folder in dict.fromkeys((spec.local_dir, spec.name, raw)):
        candidate = root / folder
        if _is_task_folder(candidate):
            return _load_local_task(candidate, split_seed)
        tried.append(str(candidate))
    if root == SHIPPED_DATA_DIR:
        raise DataError(
            f"Task {name!r}: the copy shipped with graphlora is missing ({tried[0]}/test.json); "
            "reinstall graphlora, or pass --data-dir DIR (or set "
            f"{DATA_DIR_ENV}=DIR) where DIR/{spec.local_dir}/test.json exists."
        )
    hub_hint = f", or use {HUB_PREFIX}{name} for the Hub version" if spec.hub_path else ""
    raise DataError(
        f"Task {name!r} not found in the data dir given by {chosen_by}: tried "
        f"{', '.join(tried)} (none holds test.json). Put the LLM-Adapters files in "
        f"{root / spec.local_dir}/, or drop --data-dir and unset {DATA_DIR_ENV} to use the copy "
        f"shipped with graphlora{hub_hint}."
    )
