"""The ``synthetic`` task: a generated, offline key-to-colour lookup (:func:`make_synthetic_task`)
that small adapters on a random frozen model can learn, used by the tests and CPU smoke runs."""

from __future__ import annotations

import random

from graphlora.examples import DatasetSplits, Example

__all__ = ["SYNTHETIC_KEYS", "SYNTHETIC_WORDS", "make_synthetic_task", "synthetic_answer"]

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
