from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from graphlora import data
from graphlora.data import (
    DATA_DIR_ENV,
    SHIPPED_DATA_DIR,
    TASKS,
    DataError,
    DatasetSplits,
    Example,
    canonical_task_name,
    load_task,
)
from graphlora.examples import ANSWER_PREFIX, load_llm_adapters_file
from graphlora.synthetic import make_synthetic_task, synthetic_answer

SHIPPED = SHIPPED_DATA_DIR
REPO = Path(__file__).resolve().parents[1]

# (local folder, train rows, test rows, number of candidates allowed) from task_data/README.md.
README_COUNTS = {
    "ARC-Challenge": (1119, 1172, {3, 4, 5}),
    "ARC-Easy": (2251, 2376, {3, 4, 5}),
    "boolq": (9427, 3270, {2}),
    "openbookqa": (4957, 500, {4}),
    "social_i_qa": (None, 1954, {3}),
    "piqa": (None, 1838, {2}),
    "winogrande": (None, 1267, {2}),
}


def _row(instruction: str = "Q?\n\nAnswer format: answer1/answer2", answer: str = "answer2"):
    return {
        "instruction": instruction,
        "input": "",
        "output": f"the answer is {answer}",
        "answer": answer,
    }


def _write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def _check_examples(examples: list[Example], allowed: set[int]) -> None:
    for ex in examples:
        assert len(ex.candidates) in allowed
        assert 0 <= ex.label < len(ex.candidates)
        assert ex.prompt.endswith(ANSWER_PREFIX)
        assert all(c.startswith(" ") and len(c) > 1 for c in ex.candidates)


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline mode, also for libraries that read the environment at import time."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# ---------------------------------------------------------------------------------------------
# Real LLM-Adapters files


@pytest.mark.parametrize("folder", sorted(README_COUNTS))
def test_real_files_match_readme_counts(folder: str) -> None:
    n_train, n_test, allowed = README_COUNTS[folder]
    test = load_llm_adapters_file(SHIPPED / folder / "test.json")
    assert len(test) == n_test
    _check_examples(test, allowed)
    if n_train is not None:
        train = load_llm_adapters_file(SHIPPED / folder / "train.json")
        assert len(train) == n_train
        _check_examples(train, allowed)


def test_real_file_prompt_form() -> None:
    ex = load_llm_adapters_file(SHIPPED / "ARC-Challenge" / "train.json")[0]
    assert ex.prompt.startswith("Please choose the correct answer to the question: George")
    assert "Answer1: dry palms" in ex.prompt
    assert ex.prompt.endswith("Answer format: answer1/answer2/answer3/answer4\n\nAnswer:")
    assert ex.candidates == (" answer1", " answer2", " answer3", " answer4")
    assert ex.label == 0 and ex.answer == " answer1"
    boolq = load_llm_adapters_file(SHIPPED / "boolq" / "train.json")[0]
    assert boolq.candidates == (" true", " false") and boolq.label == 0
    # WinoGrande puts "Answer format:" on the same line as the options.
    wino = load_llm_adapters_file(SHIPPED / "winogrande" / "test.json")[0]
    assert wino.candidates == (" option1", " option2") and wino.label == 1


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("arc-challenge", (1007, 112, 1172)),
        ("boolq", (8927, 500, 3270)),
        ("openbookqa", (4461, 496, 500)),
        ("siqa", (1173, 195, 586)),
        ("piqa", (1103, 184, 551)),
        ("winogrande", (760, 127, 380)),
    ],
)
def test_task_name_loads_the_shipped_copy(name: str, sizes: tuple[int, int, int]) -> None:
    splits = load_task(name, split_seed=0)  # no data dir, no environment variable
    assert (len(splits.train), len(splits.validation), len(splits.test)) == sizes
    assert splits.source == f"local:{SHIPPED / TASKS[name].local_dir}"
    assert not set(map(id, splits.train)) & set(map(id, splits.validation))


def test_shipped_copy_has_every_local_task_and_its_licences() -> None:
    assert SHIPPED.is_relative_to(Path(data.__file__).resolve().parent), "inside the package"
    for spec in TASKS.values():
        if spec.name != "synthetic":
            assert (SHIPPED / spec.local_dir / "test.json").is_file(), spec.name
    readme = (SHIPPED.parent / "README.md").read_text()
    for licence in ("CC BY-SA 4.0", "CC BY-SA 3.0", "Apache-2.0", "CC BY 4.0", "AFL-3.0"):
        assert licence in readme
    assert "Clark et al." in readme and "LLM-Adapters" in readme


def test_shipped_copy_is_package_data() -> None:
    """Every shipped file matches pyproject's package-data globs, so a wheel carries it."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["graphlora"]
    package = Path(data.__file__).resolve().parent
    shipped = {p for p in SHIPPED.parent.rglob("*") if p.is_file()}
    assert len(shipped) == 12  # 11 JSON files and the README
    missing = shipped - {p for g in globs for p in package.glob(g)}
    assert not missing, f"not in a wheel: {sorted(map(str, missing))}; add them to package-data"


def test_local_splits_are_deterministic_and_disjoint() -> None:
    a = load_task("siqa", data_dir=SHIPPED, split_seed=0)
    b = load_task("siqa", data_dir=SHIPPED, split_seed=0)
    c = load_task("siqa", data_dir=SHIPPED, split_seed=1)
    assert a == b
    assert a.test != c.test
    everything = load_llm_adapters_file(SHIPPED / "social_i_qa" / "test.json")
    parts = a.train + a.validation + a.test
    assert Counter(parts) == Counter(everything)  # a partition of the file (it has duplicates)

    boolq = load_task("boolq", data_dir=SHIPPED, split_seed=5)
    assert boolq.test == load_llm_adapters_file(SHIPPED / "boolq" / "test.json")


# ---------------------------------------------------------------------------------------------
# Name resolution


def _tiny_task(root: Path, folder: str, *, train: bool = True) -> Path:
    rows = [_row(answer=f"answer{1 + i % 2}") for i in range(20)]
    if train:
        _write(root / folder / "train.json", rows)
    _write(root / folder / "test.json", rows[:10])
    return root / folder


def test_names_and_aliases() -> None:
    assert canonical_task_name("ARC_Challenge") == "arc-challenge"
    assert canonical_task_name("arc-c") == "arc-challenge"
    assert canonical_task_name("obqa") == "openbookqa"
    assert canonical_task_name("social_i_qa") == "siqa"
    assert canonical_task_name("SIQA") == "siqa"
    assert canonical_task_name("Synthetic") == "synthetic"
    assert canonical_task_name("imagenet") is None


def test_resolution_folder_file_data_dir_env_and_shipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _tiny_task(tmp_path / "arg", "ARC-Challenge")
    by_path = load_task(folder)
    assert by_path.source == f"local:{folder}"
    assert (len(by_path.train), len(by_path.validation), len(by_path.test)) == (18, 2, 10)

    single = load_task(folder / "test.json")  # a single file is split three ways
    assert (len(single.train), len(single.validation), len(single.test)) == (6, 1, 3)

    assert load_task("arc_challenge", data_dir=tmp_path / "arg").source == f"local:{folder}"

    assert load_task("arc_challenge").source == f"local:{SHIPPED / 'ARC-Challenge'}"
    env_folder = _tiny_task(tmp_path / "env", "ARC-Challenge", train=False)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert load_task("arc-challenge").source == f"local:{env_folder}"
    # An explicit data_dir wins over the environment.
    assert load_task("arc-challenge", data_dir=tmp_path / "arg").source == f"local:{folder}"
    # An empty variable counts as unset.
    monkeypatch.setenv(DATA_DIR_ENV, "")
    assert load_task("arc-challenge").source == f"local:{SHIPPED / 'ARC-Challenge'}"


def test_unknown_name_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Unknown task 'imagenet'.*arc-challenge.*hub:<task>"):
        load_task("imagenet")
    with pytest.raises(DataError, match="no such file or folder"):
        load_task(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="no test.json"):
        load_task(tmp_path)


def test_data_dir_without_the_task_names_tried_paths(tmp_path: Path) -> None:
    # A data dir that is given must hold the task: no silent fall-back to the shipped copy.
    with pytest.raises(DataError) as excinfo:
        load_task("piqa", data_dir=tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "piqa") in message and "given by --data-dir" in message
    assert DATA_DIR_ENV in message and "shipped with graphlora" in message
    assert "hub:" not in message  # piqa has no Hub version
    with pytest.raises(DataError, match=r"or use hub:boolq for the Hub version"):
        load_task("boolq", data_dir=tmp_path)


def test_env_data_dir_without_the_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match=rf"given by {DATA_DIR_ENV}: tried {tmp_path / 'boolq'}"):
        load_task("boolq")


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub


def test_offline_hub_failure_is_fast_and_explains_what_to_do() -> None:
    start = time.monotonic()
    with pytest.raises(DataError) as excinfo:
        load_task("hub:boolq")
    assert time.monotonic() - start < 10.0, "offline hub failure must not retry for seconds"
    message = str(excinfo.value)
    assert message.startswith("Could not load task hub:boolq: ")
    assert "google/boolq" in message and "drop the 'hub:' prefix" in message


def test_hub_is_only_used_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: str, config: str | None) -> None:
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr(data, "_load_hub_dataset", fail)
    assert load_task("arc-challenge").source.startswith("local:")  # never touches the Hub
    with pytest.raises(DataError, match=r"allenai/ai2_arc \(config ARC-Challenge\)"):
        load_task("HUB:ARC_Challenge")


def test_hub_prefix_needs_a_hub_task() -> None:
    with pytest.raises(DataError, match=r"^hub:piqa: 'piqa' has no Hugging Face Hub.*hub:boolq"):
        load_task("hub:piqa")
    with pytest.raises(DataError, match=r"^hub:imagenet: 'imagenet' is not a task"):
        load_task("hub:imagenet")


def _fake_hub(monkeypatch: pytest.MonkeyPatch, splits: dict[str, list[dict]]) -> list:
    calls = []

    def load(path: str, config: str | None) -> dict[str, list[dict]]:
        calls.append((path, config))
        return splits

    monkeypatch.setattr(data, "_load_hub_dataset", load)
    return calls


def test_hub_arc_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    row = {
        "question": "Which is a gas?",
        "choices": {"text": ["rock", "steam", "ice"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    }
    calls = _fake_hub(monkeypatch, {"train": [row], "validation": [row] * 2, "test": [row] * 3})
    splits = load_task("hub:arc-challenge", data_dir="/no/such/folder")  # data_dir is ignored
    assert calls == [("allenai/ai2_arc", "ARC-Challenge")]
    assert splits.source == "hub:allenai/ai2_arc/ARC-Challenge"
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (1, 2, 3)
    ex = splits.train[0]
    assert ex.candidates == (" answer1", " answer2", " answer3") and ex.label == 1
    assert "Which is a gas?\n\nAnswer1: rock Answer2: steam Answer3: ice" in ex.prompt
    assert ex.prompt.endswith("Answer format: answer1/answer2/answer3" + ANSWER_PREFIX)


def test_hub_openbookqa_numeric_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    row = {
        "question_stem": "The sun is",
        "choices": {"text": ["a star", "a planet", "a moon", "a comet"], "label": list("1234")},
        "answerKey": "1",
    }
    _fake_hub(monkeypatch, {"train": [row], "validation": [row], "test": [row]})
    assert load_task("hub:obqa").train[0].label == 0


def test_hub_boolq_halves_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"question": f"is {i} even", "passage": "...", "answer": i % 2 == 0} for i in range(10)]
    _fake_hub(monkeypatch, {"train": rows, "validation": rows[:9]})
    splits = load_task("hub:boolq", split_seed=0)
    assert (len(splits.validation), len(splits.test)) == (5, 4)
    ex = splits.train[0]
    assert ex.candidates == (" true", " false") and ex.label == 0
    assert "question: is 0 even?\n\nAnswer format: true/false" in ex.prompt
    assert splits.train[1].label == 1
    assert load_task("hub:boolq", split_seed=0) == splits


def test_hub_siqa_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    row = {
        "context": "Tracy stayed out.",
        "question": "What will Tracy do?",
        "answerA": "sleep",
        "answerB": "run",
        "answerC": "eat",
        "label": "3",
    }
    _fake_hub(monkeypatch, {"train": [row], "validation": [row] * 4})
    splits = load_task("hub:social_i_qa")
    assert splits.train[0].label == 2 and len(splits.train[0].candidates) == 3
    assert "Tracy stayed out. What will Tracy do?" in splits.train[0].prompt
    assert (len(splits.validation), len(splits.test)) == (2, 2)


def test_hub_schema_change_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hub(monkeypatch, {"train": [{"question": "q"}], "validation": [], "test": []})
    with pytest.raises(DataError, match=r"split 'train', row 0.*schema"):
        load_task("hub:arc-easy")


# ---------------------------------------------------------------------------------------------
# Malformed files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.json: file not found"):
        load_llm_adapters_file(tmp_path / "nope.json")


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "x",\n  oops\n]')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 3"):
        load_llm_adapters_file(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"instruction": "x"}, "expected a JSON list"),
        ([], "empty"),
    ],
)
def test_not_a_list(tmp_path: Path, content, message: str) -> None:
    path = _write(tmp_path / "t.json", content)
    with pytest.raises(DataError, match=message):
        load_llm_adapters_file(path)


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"instruction": "Q\n\nAnswer format: a/b", "input": ""}, "missing key 'answer'"),
        ({"answer": "a"}, "missing key 'instruction'"),
        ("just a string", "expected an object"),
        (_row(instruction="Q with no format line"), "no 'Answer format"),
        (_row(answer="answer3"), r"answer 'answer3' is not among the candidates"),
        (_row(instruction="Q\n\nAnswer format: answer1"), "at least two distinct"),
        ({**_row(), "answer": 1}, "must be a string"),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path: Path, bad_row, message: str) -> None:
    path = _write(tmp_path / "task" / "train.json", [_row(), _row(), bad_row, _row()])
    with pytest.raises(DataError, match=message) as excinfo:
        load_llm_adapters_file(path)
    assert f"{path}, row 2:" in str(excinfo.value)


def test_answer_matching_ignores_case_and_spaces(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.json", [_row(answer=" Answer1 ")])
    assert load_llm_adapters_file(path)[0].label == 0


def test_input_field_is_appended(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.json", [{**_row(), "input": "some context"}])
    assert load_llm_adapters_file(path)[0].prompt.endswith("some context" + ANSWER_PREFIX)


def test_example_validation() -> None:
    assert Example("p", [" a", " b"], 1).candidates == (" a", " b")
    with pytest.raises(ValueError, match="out of range"):
        Example("p", (" a", " b"), 2)
    with pytest.raises(ValueError, match="at least 2 candidates"):
        Example("p", (" a",), 0)


# ---------------------------------------------------------------------------------------------
# Synthetic task


def test_synthetic_is_deterministic_and_seeded() -> None:
    a = make_synthetic_task(n_train=50, n_val=10, n_test=10, seed=0)
    assert a == make_synthetic_task(n_train=50, n_val=10, n_test=10, seed=0)
    assert a.train != make_synthetic_task(n_train=50, n_val=10, n_test=10, seed=1).train
    assert (len(a.train), len(a.validation), len(a.test)) == (50, 10, 10)
    assert isinstance(load_task("synthetic", split_seed=3), DatasetSplits)
    assert load_task("synthetic", split_seed=3) == make_synthetic_task(seed=3)


def test_synthetic_examples_follow_the_rule() -> None:
    splits = make_synthetic_task(n_train=200, n_val=0, n_test=0)
    for ex in splits.train:
        key = ex.prompt.split("color of ")[1][0]
        assert ex.answer == synthetic_answer(key)
        assert len(ex.candidates) == 4 and len(set(ex.candidates)) == 4
        assert len({len(c) for c in ex.candidates}) == 1, "equal-length candidates"
        assert ex.prompt.startswith("options: " + " ".join(c.strip() for c in ex.candidates))


def test_synthetic_chance_level() -> None:
    splits = make_synthetic_task(n_train=4000, n_val=0, n_test=0)
    n = len(splits.train)
    # No position or word prior: the best key-blind guesses stay near 1/4.
    by_position = Counter(ex.label for ex in splits.train)
    assert max(by_position.values()) / n < 0.28
    by_word = Counter(ex.answer for ex in splits.train)
    shown = Counter(c for ex in splits.train for c in ex.candidates)
    assert max(by_word[w] / shown[w] for w in shown) < 0.28
    assert make_synthetic_task(10, 0, 0, num_candidates=2).train[0].candidates.__len__() == 2
    with pytest.raises(ValueError, match="num_candidates"):
        make_synthetic_task(num_candidates=9)
