"""The `fingerprint` command: one subcommand per typed `main(config)`; every flag comes from a config field.

Subcommands that need Ray or MLflow (sweep, train-ray, promote, serve, demo) live in jobs/ and serve/ and are
found through the `fingerprint.commands` entry-point group, so this library never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from fingerprint.config import ConfigError, add_arguments, from_args


@dataclass(frozen=True)
class Command:
    """A subcommand: a config dataclass and the typed `main(config)` it feeds."""

    config: type
    main: Callable[[Any], Any]
    help: str


def _lazy(module: str, config: str) -> Callable[[], Command]:
    def load() -> Command:
        mod = importlib.import_module(module)
        cls = getattr(mod, config)  # each command module imports or defines its config class
        return Command(cls, mod.main, (mod.__doc__ or "").strip().splitlines()[0])

    return load


BUILTIN: dict[str, Callable[[], Command]] = {
    "fit": _lazy("fingerprint.commands.fit", "FitConfig"),
    "train": _lazy("fingerprint.commands.train", "TrainRunConfig"),
    "predict": _lazy("fingerprint.commands.predict", "PredictConfig"),
    "evaluate": _lazy("fingerprint.commands.evaluate", "EvaluateConfig"),
    "report": _lazy("fingerprint.commands.report", "ReportConfig"),
    "sample-data": _lazy("fingerprint.commands.sample_data", "SampleDataConfig"),
    "benchmark": _lazy("fingerprint.evaluation.benchmark", "BenchmarkConfig"),
    "zoo": _lazy("fingerprint.commands.zoo", "ZooConfig"),
    "suite": _lazy("fingerprint.commands.suite", "SuiteConfig"),
    "null-calibration": _lazy("fingerprint.evaluation.null_calibration", "NullCalibrationConfig"),
}


def commands() -> dict[str, Callable[[], Command]]:
    found = dict(BUILTIN)
    for ep in entry_points(group="fingerprint.commands"):
        # The entry point names a zero-argument factory returning a Command (imported only when chosen).
        found.setdefault(ep.name, lambda ep=ep: ep.load()())
    return found


def build_parser(available: dict[str, Callable[[], Command]]) -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="fingerprint",
        description="Which real images trained the generator? Membership inference for synthetic images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    loaded: dict[str, Command] = {}
    for name, load in available.items():
        try:
            cmd = load()
        except ImportError as e:  # an optional part (e.g. Ray) not installed: say so, keep the rest working
            sub.add_parser(name, help=f"(unavailable: {e})".replace("%", "%%"))
            continue
        loaded[name] = cmd
        text = re.sub(r"^`fingerprint [\w-]+`:\s*", "", cmd.help).replace("%", "%%")
        p = sub.add_parser(name, help=text, description=text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_arguments(p, cmd.config)
    return parser, loaded


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = commands()
    # Build only the chosen subcommand's parser when we can: importing every command (Ray, MLflow) is slow.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen in available and not any(a in ("-h", "--help") for a in argv[: argv.index(chosen)]):
        available = {chosen: available[chosen]}
    parser, loaded = build_parser(available)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command not in loaded:
        parser.error(f"'{args.command}' is not available in this installation")
    return run(loaded[args.command], args, f"fingerprint {args.command}")


def run(cmd: Command, args: argparse.Namespace, label: str) -> int:
    """Run a parsed command: 0 on success, 2 with a one-line message for expected, explained failures, 130 with
    one line when interrupted (Ctrl-C)."""
    try:
        cmd.main(from_args(cmd.config, args))
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad flags, bad files: the message is the whole story, a traceback would only hide it (-v shows it).
        logging.getLogger("fingerprint").debug("details", exc_info=True)
        print(f"{label}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Ctrl-C is the user's choice, not a failure to explain: one line (with what the command kept, if it says),
        # no traceback, and the shell's exit code for SIGINT.
        print(f"{label}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
