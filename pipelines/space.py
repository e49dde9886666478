"""`graphlora-space [SPACE...]`: validate search-space files without starting anything.

The schema is in `pipelines/schema.py`, the checks in `pipelines/validate.py`.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.errors import SpaceError
from pipelines.validate import DEFAULT_SPACE, load_search_space, shipped_spaces


def main(argv: list[str] | None = None) -> int:
    """`graphlora-space [SPACE...]`: validate space files against the training API."""
    parser = argparse.ArgumentParser(
        prog="graphlora-space",
        description="Validate search spaces without starting anything; one error line and exit "
        "status 2 on the first bad one.",
    )
    parser.add_argument(
        "spaces",
        nargs="*",
        metavar="SPACE",
        default=[DEFAULT_SPACE],
        help="a space YAML, or the name of a shipped space "
        f"({', '.join(shipped_spaces())}); default: %(default)s",
    )
    for p in parser.parse_args(argv).spaces:
        try:
            space = load_search_space(p)
        except SpaceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"ok: {p}: {len(space.search)} searched parameters, {space.budget.trials} trials")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
