"""Multiple-choice tasks as (prompt, candidates, label) examples.

Every task, whatever its source, becomes a list of :class:`Example`. The model sees exactly
``prompt + candidate``: it is trained on ``prompt + candidates[label]`` and scored by the
log-likelihood of each candidate given the prompt (candidates may span several tokens).

Prompt form (the same for local files and the Hub, so results are comparable)::

    <LLM-Adapters instruction, which lists the options and ends with "Answer format: a/b/c">

    Answer:

and the candidates are the labels of the ``Answer format`` line with a leading space:
``(" answer1", " answer2", " answer3", " answer4")`` or ``(" true", " false")``. The prompt ends
without a space and each candidate starts with one, so BPE tokenizers split ``prompt +
candidate`` exactly at the boundary (the space belongs to the candidate's first token).

Where a task comes from (details in :func:`load_task`):

1. a path: a folder holding ``train.json``/``test.json`` (or only ``test.json``), or one ``.json``
   file, in the LLM-Adapters "commonsense" format;
2. a task name (``arc-challenge``, ``boolq``...): the task's folder under a data dir
   (``data_dir=``, else the ``GRAPHLORA_DATA_DIR`` environment variable), else under the copy
   shipped with graphlora (:data:`SHIPPED_DATA_DIR`), so a task name works offline;
3. ``hub:<task>`` (``hub:arc-challenge``): the Hugging Face Hub, in the datasets' original schemas
   and published splits (so its numbers are not comparable with the LLM-Adapters files');

plus ``synthetic``, a generated offline task (:func:`make_synthetic_task`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ANSWER_PREFIX",
    "DATA_DIR_ENV",
    "HUB_PREFIX",
    "SHIPPED_DATA_DIR",
    "TASKS",
    "DataError",
    "DatasetSplits",
    "Example",
    "TaskSpec",
    "canonical_task_name",
    "format_prompt",
    "load_llm_adapters_file",
    "load_task",
    "make_synthetic_task",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "GRAPHLORA_DATA_DIR"
"""Environment variable naming a data dir: one folder per task (``ARC-Challenge/``, ``boolq/``...)
holding the LLM-Adapters ``train.json``/``test.json``."""

SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "task_data" / "commonsense"
"""The seven LLM-Adapters commonsense tasks shipped with graphlora (package data; sources and
licences in ``task_data/README.md``); used when no data dir is given."""

HUB_PREFIX = "hub:"
"""Task-name prefix that loads the Hugging Face Hub version of a task: ``hub:arc-challenge``."""

ANSWER_PREFIX = "\n\nAnswer:"
"""Appended to every instruction; candidates start with a space and follow it directly."""

VALIDATION_FRACTION = 0.1
"""Share of the training file held out for validation (local files)."""
MAX_VALIDATION = 500
"""Cap on the held-out validation set (local files)."""
TEST_FRACTION = 0.3
"""Share kept for test when a task only has a test file and must be split three ways."""

_ANSWER_FORMAT = re.compile(r"answer format:\s*(?P<labels>[^\n]*)", re.IGNORECASE)


class DataError(ValueError):
    """Malformed or missing task data; the message names the file, the row and what to do."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice item.

    Attributes:
        prompt: Text the model is conditioned on.
        candidates: Candidate continuations; the model sees ``prompt + candidate``.
        label: Index of the correct candidate.
        question: The question alone, without the instruction's preamble and listed options,
            where it can be read (the LLM-Adapters files, the Hub tasks); else None.
        options: The option texts the candidates stand for (``options[i]`` for
            ``candidates[i]``), where they can be read; empty otherwise (BoolQ's files carry no
            passage, so there is nothing to read). An encoder scores these, not the labels.
    """

    prompt: str
    candidates: tuple[str, ...]
    label: int
    question: str | None = None
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, tuple):
            object.__setattr__(self, "candidates", tuple(self.candidates))
        if len(self.candidates) < 2:
            raise ValueError(
                f"Example needs at least 2 candidates, got {len(self.candidates)}: "
                f"{self.candidates!r}."
            )
        if not isinstance(self.options, tuple):
            object.__setattr__(self, "options", tuple(self.options))
        if self.options and len(self.options) != len(self.candidates):
            raise ValueError(
                f"Example.options has {len(self.options)} texts for {len(self.candidates)} "
                "candidates; give one option text per candidate, or none."
            )
        if not 0 <= self.label < len(self.candidates):
            raise ValueError(
                f"Example.label {self.label} is out of range for {len(self.candidates)} "
                "candidates; it must be the index of the correct candidate."
            )

    @property
    def answer(self) -> str:
        """The correct candidate, ``candidates[label]``."""
        return self.candidates[self.label]


@dataclass
class DatasetSplits:
    """Train, validation and test examples of one task.

    Attributes:
        train: Examples to fine-tune on.
        validation: Examples for model selection (hyperparameter search, early stopping).
        test: Examples for the reported accuracy.
        source: Where the data came from, e.g. ``"local:/data/ARC-Challenge"``,
            ``"hub:allenai/ai2_arc/ARC-Challenge"`` or ``"synthetic(seed=0)"``.
    """

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    source: str

    def sizes(self) -> dict[str, int]:
        """Returns ``{"train": n, "validation": n, "test": n}``."""
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
        }


# ----------------------------------------------------------------------------------------------
# LLM-Adapters files


def format_prompt(instruction: str, input_text: str = "") -> str:
    """Builds the prompt from an LLM-Adapters instruction (and optional input).

    Args:
        instruction: The instruction, options and ``Answer format`` line included.
        input_text: The ``input`` field; empty for the commonsense tasks.

    Returns:
        ``instruction [+ "\\n\\n" + input] + ANSWER_PREFIX``.
    """
    text = instruction.strip()
    if input_text.strip():
        text = f"{text}\n\n{input_text.strip()}"
    return text + ANSWER_PREFIX


def _candidate(label: str) -> str:
    return " " + label


def _parse_answer_format(instruction: str) -> list[str] | None:
    """Returns the labels named on the last ``Answer format:`` line, or None when absent."""
    matches = list(_ANSWER_FORMAT.finditer(instruction))
    if not matches:
        return None
    return [label.strip() for label in matches[-1].group("labels").split("/")]


def parse_listed_options(instruction: str, labels: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """The question and the option texts an LLM-Adapters instruction lists as ``Label1: text
    Label2: text`` (labels as on its ``Answer format`` line, any case) before that line.

    Returns:
        ``(question, options)``: the question without the instruction's preamble (the text up to
        the first ``": "``, e.g. "Please choose the correct answer to the question: ") and one
        text per label; ``(question, ())`` when the options are not listed (BoolQ).
    """
    fmt = list(_ANSWER_FORMAT.finditer(instruction))
    body = instruction[: fmt[-1].start()] if fmt else instruction
    markers, pos = [], 0
    for label in labels:
        found = re.compile(rf"\b{re.escape(label)}\s*:", re.IGNORECASE).search(body, pos)
        if found is None:
            markers = []
            break
        markers.append(found)
        pos = found.end()
    head = body[: markers[0].start()] if markers else body
    question = head.split(": ", 1)[1] if ": " in head.split("\n", 1)[0] else head
    if not markers:
        return question.strip(), ()
    ends = [m.start() for m in markers[1:]] + [len(body)]
    options = tuple(body[m.end() : end].strip() for m, end in zip(markers, ends, strict=True))
    return question.strip(), options


def _example_from_row(row: Any, path: Path, index: int) -> Example:
    where = f"{path}, row {index}"
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object with keys instruction/input/output/answer, "
            f"got {type(row).__name__}."
        )
    for key in ("instruction", "answer"):
        if key not in row:
            raise DataError(
                f"{where}: missing key {key!r} (keys present: {sorted(row)}). Each row needs "
                "'instruction' and 'answer' (LLM-Adapters format)."
            )
        if not isinstance(row[key], str):
            raise DataError(
                f"{where}: key {key!r} must be a string, got {type(row[key]).__name__}."
            )
    input_text = row.get("input") or ""
    if not isinstance(input_text, str):
        raise DataError(f"{where}: key 'input' must be a string, got {type(input_text).__name__}.")
    instruction = row["instruction"]
    labels = _parse_answer_format(instruction)
    if labels is None:
        raise DataError(
            f"{where}: the instruction has no 'Answer format: a/b/...' line, so the candidate "
            "answers are unknown. End the instruction with e.g. "
            "'Answer format: answer1/answer2/answer3/answer4'."
        )
    if len(labels) < 2 or any(not label for label in labels) or len(set(labels)) != len(labels):
        raise DataError(
            f"{where}: the 'Answer format' line lists {labels!r}; it needs at least two "
            "distinct, non-empty labels separated by '/'."
        )
    answer = row["answer"].strip()
    if answer not in labels:
        folded = [label.casefold() for label in labels]
        if answer.casefold() not in folded:
            raise DataError(
                f"{where}: answer {answer!r} is not among the candidates {labels!r} of its "
                "'Answer format' line."
            )
        answer = labels[folded.index(answer.casefold())]
    question, options = parse_listed_options(instruction, labels)
    return Example(
        prompt=format_prompt(instruction, input_text),
        candidates=tuple(_candidate(label) for label in labels),
        label=labels.index(answer),
        question=question,
        options=options if all(options) else (),
    )


def load_llm_adapters_file(path: str | os.PathLike[str]) -> list[Example]:
    """Reads one LLM-Adapters "commonsense" JSON file.

    The file is a JSON list of ``{"instruction", "input", "output", "answer"}`` objects; the
    candidate labels are on the instruction's ``Answer format: a/b/c`` line and ``answer`` is one
    of them. Every row is validated before anything is returned.

    Args:
        path: The ``.json`` file.

    Returns:
        One :class:`Example` per row, in file order (prompt form: see the module docstring).

    Raises:
        DataError: The file is missing, is not valid JSON, is not a non-empty list, or a row lacks
            a field, has no ``Answer format`` line or an answer that is not among its candidates.
            The message names the file and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: file not found. Expected an LLM-Adapters JSON file (a list of "
            "{instruction, input, output, answer}); check the path or --data-dir."
        )
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}."
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: could not read the file as UTF-8 text: {err}.") from err
    if not isinstance(rows, list):
        raise DataError(
            f"{path}: expected a JSON list of {{instruction, input, output, answer}} objects, "
            f"got a JSON {type(rows).__name__}."
        )
    if not rows:
        raise DataError(f"{path}: the list is empty; a task file needs at least one row.")
    return [_example_from_row(row, path, i) for i, row in enumerate(rows)]


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


def _splits_from_local(train: list[Example] | None, test: list[Example], seed: int, source: str):
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


def _load_local_task(location: Path, seed: int) -> DatasetSplits:
    if location.is_file():
        return _splits_from_local(None, load_llm_adapters_file(location), seed, f"local:{location}")
    train_file, test_file = location / "train.json", location / "test.json"
    if not test_file.is_file():
        raise DataError(
            f"{location}: no test.json in this folder. A task folder holds test.json and "
            "optionally train.json (LLM-Adapters format)."
        )
    train = load_llm_adapters_file(train_file) if train_file.is_file() else None
    return _splits_from_local(train, load_llm_adapters_file(test_file), seed, f"local:{location}")


# ----------------------------------------------------------------------------------------------
# Hugging Face Hub (original schemas)


def _mc_instruction(question: str, options: Sequence[str]) -> str:
    listed = " ".join(f"Answer{i + 1}: {text}" for i, text in enumerate(options))
    labels = "/".join(f"answer{i + 1}" for i in range(len(options)))
    return (
        f"Please choose the correct answer to the question: {question.strip()}\n\n"
        f"{listed}\n\nAnswer format: {labels}"
    )


def mc_example(question: str, options: Sequence[str], label: int) -> Example:
    """A multiple-choice example as the LLM-Adapters files write one: the options listed in the
    instruction as answer1..answerN (what a decoder is trained on), and their texts (for an
    encoder)."""
    return Example(
        prompt=format_prompt(_mc_instruction(question, options)),
        candidates=tuple(_candidate(f"answer{i + 1}") for i in range(len(options))),
        label=label,
        question=question,
        options=tuple(options),
    )


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
        candidates=(_candidate("true"), _candidate("false")),
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


def _load_hub_task(spec: TaskSpec, seed: int) -> DatasetSplits:
    assert spec.hub_path is not None
    hub_name = spec.hub_path + (f" (config {spec.hub_config})" if spec.hub_config else "")
    try:
        dataset = _load_hub_dataset(spec.hub_path, spec.hub_config)
    except Exception as err:  # datasets raises ConnectionError, OSError, ValueError, ...
        raise DataError(
            f"Could not load task {HUB_PREFIX}{spec.name}: the Hugging Face Hub dataset "
            f"{hub_name} failed to load ({type(err).__name__}: {_first_line(err)}). Check the "
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_task_folder(path: Path) -> bool:
    return path.is_dir() and (path / "test.json").is_file()


def _hub_task(raw: str, task: str, seed: int) -> DatasetSplits:
    """Loads ``hub:<task>``: the named task's Hugging Face Hub version."""
    name = canonical_task_name(task)
    on_hub = [spec.name for spec in TASKS.values() if spec.hub_path is not None]
    if name is None or TASKS[name].hub_path is None:
        what = (
            "is not a task"
            if name is None
            else "has no Hugging Face Hub version here (drop the 'hub:' prefix for local files)"
        )
        raise DataError(
            f"{raw}: {task!r} {what}. Hub tasks: {', '.join(HUB_PREFIX + n for n in on_hub)}."
        )
    return _load_hub_task(TASKS[name], seed)


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
        return _hub_task(raw, raw[len(HUB_PREFIX) :], split_seed)
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


# ----------------------------------------------------------------------------------------------
# Synthetic task

SYNTHETIC_WORDS = ("blue", "cyan", "gold", "jade", "lime", "navy", "pink", "ruby")
"""Answer words: same length, distinct first letters, so no candidate is favoured by length or
by a shared prefix and one byte decides the answer."""
SYNTHETIC_KEYS = tuple("ABCDEFGHJKLMNPQR")
"""Keys: one character each, looked up through a fixed table (see :func:`synthetic_answer`)."""


def synthetic_answer(key: str) -> str:
    """The fixed rule of the synthetic task: the answer word of a key.

    Key ``i`` (its index in :data:`SYNTHETIC_KEYS`) maps to word ``(5 * i + 3) % 8`` of
    :data:`SYNTHETIC_WORDS`, so each word is the answer for exactly two keys and the rule is
    neither alphabetical nor positional.
    """
    index = SYNTHETIC_KEYS.index(key)
    return SYNTHETIC_WORDS[(5 * index + 3) % len(SYNTHETIC_WORDS)]


def _synthetic_example(rng: random.Random, num_candidates: int) -> Example:
    key = rng.choice(SYNTHETIC_KEYS)
    answer = synthetic_answer(key)
    distractors = rng.sample([w for w in SYNTHETIC_WORDS if w != answer], num_candidates - 1)
    options = [answer, *distractors]
    rng.shuffle(options)
    # The prompt ends on the key and the answer follows it directly, so the token that decides
    # the answer is predicted from the key's own position: learnable by small adapters on a
    # random frozen model, yet only through the adapters (the base model knows no rule).
    prompt = f"options: {' '.join(options)}\ncolor of {key}"
    return Example(
        prompt=prompt,
        candidates=tuple(options),
        label=options.index(answer),
    )


def make_synthetic_task(
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 500,
    seed: int = 0,
    num_candidates: int = 4,
) -> DatasetSplits:
    """Generates the offline ``synthetic`` task: a key-to-colour lookup.

    Each prompt lists ``num_candidates`` colour words in random order and ends on a one-letter
    key; the answer word follows the key directly::

        options: pink gold navy ruby
        color of K          + candidate "navy"

    The answer is a fixed function of the key (:func:`synthetic_answer`: 16 keys, 8 words, each
    word the answer of two keys); candidates are the listed words, in the listed order. Every
    word is equally likely to be correct and the order is shuffled, so a model that ignores the
    key is at chance (``1 / num_candidates``). The token that decides the answer (the word's
    first letter, all different) is predicted at the key's own position, so small adapters on a
    random frozen model can learn the table within a few hundred steps, while the learning rate
    and adapter size still decide whether they do. Generation is deterministic given the
    arguments; the three splits are drawn from independent streams.

    Args:
        n_train: Training examples.
        n_val: Validation examples.
        n_test: Test examples.
        seed: Generation seed.
        num_candidates: Candidates per example, 2 to 8.

    Returns:
        The splits, with ``source`` recording the arguments.
    """
    if not 2 <= num_candidates <= len(SYNTHETIC_WORDS):
        raise ValueError(
            f"num_candidates must be between 2 and {len(SYNTHETIC_WORDS)}, got {num_candidates}."
        )
    for arg, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if value < 0:
            raise ValueError(f"{arg} must be >= 0, got {value}.")

    def draw(n: int, stream: int) -> list[Example]:
        rng = random.Random(f"graphlora-synthetic/{seed}/{stream}")
        return [_synthetic_example(rng, num_candidates) for _ in range(n)]

    return DatasetSplits(
        train=draw(n_train, 0),
        validation=draw(n_val, 1),
        test=draw(n_test, 2),
        source=(
            f"synthetic(seed={seed}, n_train={n_train}, n_val={n_val}, n_test={n_test}, "
            f"num_candidates={num_candidates})"
        ),
    )
