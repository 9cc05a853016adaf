"""Fill docs/man/walled-garden.8.in with the commands, from the command's own argparse parser.

Run by the Debian package build (.ci/debian/rules) with the packaged interpreter, so the manual
describes exactly the commands and options that are installed; prints the roff page.
Usage: manpage.py TEMPLATE > walled-garden.8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import metadata
from pathlib import Path

from enforcer.cli import build_parser


def roff(text: str) -> str:
    """Text safe in a roff line: backslashes and dashes escaped, no control character first."""
    text = " ".join(text.split()).replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in the order --help lists them."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
    return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]


def option_label(action: argparse.Action) -> str:
    """``--mode {a,b,c}`` / ``query`` as roff: options bold, values italic."""
    if not action.option_strings:
        return f"\\fI{roff(action.metavar or action.dest)}\\fR"  # type: ignore[arg-type]
    names = ", ".join(f"\\fB{roff(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices:
        value = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        value = str(action.metavar or action.dest.upper())
    return f"{names} \\fI{roff(value)}\\fR"


def commands(parser: argparse.ArgumentParser) -> str:
    lines = []
    for name, help_, sub in subcommands(parser):
        usage = sub.format_usage().removeprefix("usage: ").strip()
        lines += [f".SS {roff(name)}", roff(help_[:1].upper() + help_[1:]) + ".", ".PP", ".nf",
                  roff(usage), ".fi"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            lines += [".TP", option_label(action), roff(action.help or "")] if action.help else \
                [".TP", option_label(action)]
    return "\n".join(line for line in lines if line)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    os.environ["COLUMNS"] = "1000"   # one usage line per command: .nf keeps it unwrapped
    os.environ.pop("WALLED_GARDEN_CONFIG", None)   # --config's help names the packaged default
    parser = build_parser()
    when = time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH") or time.time()))
    page = Path(argv[1]).read_text()
    page = page.replace("@DATE@", time.strftime("%Y-%m-%d", when))
    page = page.replace("@VERSION@", metadata.version("walled-garden"))
    sys.stdout.write(page.replace("@COMMANDS@", commands(parser)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
