"""`python -m openvision_max.launch SUBCOMMAND [options] -- CONFIG [key=value ...]`

Launchers of the training binary. Subcommands: `local` (N processes on this machine, local_cluster.py) and
`gke` (a JobSet manifest for GKE TPU or GPU node pools, gke.py).
Everything after the first `--` is the training command's arguments, passed on untouched; the launcher
parses only what comes before it. Usage errors print one line and exit 2.

A subcommand is a module with `add_parser(subparsers)`, which adds its parser and sets the default `run`:
`run(parser, args, command)` -> exit status, where `command` is the list after `--` (None when there is
no `--`). Keep these modules light (standard library): the launcher must start fast and never import JAX.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from openvision_max.launch import gke, local_cluster

PROG = "python -m openvision_max.launch"
SUBCOMMANDS = (local_cluster, gke)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block: the contract is one line + exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Launch the training binary on several processes or hosts.",
               usage=f"{PROG} SUBCOMMAND [options] -- CONFIG [key=value ...]")
    sub = p.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for module in SUBCOMMANDS:
        sub_parser = module.add_parser(sub)
        sub_parser.set_defaults(parser=sub_parser)   # its errors name the subcommand
    return p


def split_command(argv: list[str]) -> tuple[list[str], Optional[list[str]]]:
    """(the launcher's arguments, the training command after the first `--`, or None without one)."""
    if "--" not in argv:
        return argv, None
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def main(argv: Optional[list[str]] = None) -> int:
    own, command = split_command(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(own)
    return args.run(args.parser, args, command)


if __name__ == "__main__":
    sys.exit(main())
