"""The ``densenet`` command: argument parsing over the Python API, nothing else.

One module per group of sub-commands (``train.py``: train, recipes; ``inference.py``: eval,
predict; ``cam.py``; ``export.py``; ``analysis.py``: models, summary, analyze, plot, report;
``bench.py``), each with ``register(subparsers)`` that adds its parsers and sets ``func``. This
file builds the parser, dispatches, and turns a user's mistake (a :class:`~densenet.UsageError`)
into a one-paragraph message with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..errors import UsageError
from . import analysis, bench, cam, export, inference, train

# In the order ``densenet --help`` lists them.
COMMANDS = (train, inference, cam, export, analysis, bench)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}. Run '{self.prog} --help' for the options.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="densenet", description="DenseNet (Huang et al., CVPR 2017): train, "
                     "evaluate, analyse and export densely connected networks.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback when a command fails")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMANDS:
        module.register(sub)
    return parser


def _debug_requested(argv) -> bool:
    return "--debug" in argv or os.environ.get("DENSENET_DEBUG") == "1"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        parser = build_parser()
        if not argv:
            argv = ["train"]  # the main job: `densenet` alone runs the quickstart
        args = parser.parse_args(argv)
        args.argv = argv
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        result = args.func(args)
        return int(result or 0)
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"densenet: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `densenet summary ... | head`: the reader stopped listening
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("densenet: interrupted.", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            traceback.print_exc()
        print("densenet: error: out of memory. Use a smaller --batch-size or model.", file=sys.stderr)
        return 1
    except Exception as e:  # an internal fault, not the user's: keep it short unless asked
        if debug:
            traceback.print_exc()
        else:
            print(f"densenet: internal error: {type(e).__name__}: {e}\n"
                  f"Run again with --debug for the traceback, and report it.", file=sys.stderr)
        return 1


def entry_point() -> None:
    sys.exit(main())
