"""`python -m serve ...` = `fingerprint serve ...` (for installs where the entry point is not registered yet)."""

import logging
import sys

from fingerprint.commands.cli import build_parser
from fingerprint.config import ConfigError, from_args
from serve.cli import command


def main(argv: list[str] | None = None) -> int:
    parser, loaded = build_parser({"serve": command})
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cmd = loaded["serve"]
    try:
        cmd.main(from_args(cmd.config, args))
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"fingerprint serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
