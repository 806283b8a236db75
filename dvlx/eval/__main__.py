"""`python -m dvlx.eval COMMAND [options]`: run one evaluation (see `python -m dvlx.eval --help`)."""

from __future__ import annotations

import importlib
import sys

from dvlx.config import did_you_mean

COMMANDS = {
    "vl": (
        "dvlx.eval.vl",
        "generate answers for image-question records and score them (exact match, choices)",
    ),
    "rollout": (
        "dvlx.eval.rollout",
        "closed-loop success of a VLA export in robosuite or LIBERO, in parallel worker processes",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        for name, (_, what) in COMMANDS.items():
            print(f"  {name:8s} {what}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown evaluation '{name}'{did_you_mean(name, list(COMMANDS))}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
