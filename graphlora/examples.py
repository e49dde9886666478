"""Multiple-choice examples: the :class:`Example` and :class:`DatasetSplits` types, the prompt form,
and the LLM-Adapters "commonsense" JSON files they are read from.

Every task, whatever its source (``graphlora.data.load_task``), becomes a list of :class:`Example`.
The model sees exactly ``prompt + candidate``: it is trained on ``prompt + candidates[label]`` and
scored by the log-likelihood of each candidate given the prompt (candidates may span several
tokens).

Prompt form (the same for local files and the Hub, so results are comparable)::

    <LLM-Adapters instruction, which lists the options and ends with "Answer format: a/b/c">

    Answer:

and the candidates are the labels of the ``Answer format`` line with a leading space:
``(" answer1", " answer2", " answer3", " answer4")`` or ``(" true", " false")``. The prompt ends
without a space and each candidate starts with one, so BPE tokenizers split ``prompt +
candidate`` exactly at the boundary (the space belongs to the candidate's first token).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ANSWER_PREFIX",
    "DataError",
    "DatasetSplits",
    "Example",
    "first_line",
    "format_prompt",
    "load_llm_adapters_file",
    "mc_example",
    "parse_listed_options",
]

ANSWER_PREFIX = "\n\nAnswer:"
"""Appended to every instruction; candidates start with a space and follow it directly."""

_ANSWER_FORMAT = re.compile(r"answer format:\s*(?P<labels>[^\n]*)", re.IGNORECASE)


class DataError(ValueError):
    """Malformed or missing task data; the message names the file, the row and what to do."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
