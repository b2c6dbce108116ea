"""`hope-hf` command line: `hope-hf quickstart [...]`."""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"quickstart"}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: hope-hf {{{','.join(sorted(commands))}}} [options]")
    if argv[0] == "quickstart":
        from .quickstart import main as quickstart

        quickstart(argv[1:])


if __name__ == "__main__":
    main()
