"""`python -m jobs.<module>`: run one job command with the same flags and error handling as `fingerprint <cmd>`.

Used until the `fingerprint.commands` entry points are installed; afterwards `fingerprint <cmd>` is the same thing.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from fingerprint.commands import cli


def run_command(name: str, load: Callable[[], cli.Command], argv: Sequence[str] | None = None) -> int:
    """Parse `argv` for command `name` and run it; 2 with a one-line message for expected failures."""
    parser, loaded = cli.build_parser({name: load})
    parser.prog = f"python -m {load.__module__}"
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = [a for a in argv if a in ("-v", "--verbose")]  # a top-level flag: it goes before the command
    args = parser.parse_args([*verbose, name, *(a for a in argv if a not in verbose)])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli.run(loaded[name], args, name)
