"""The ``pio-fvlm`` command: ``pio-fvlm bench [options]`` (see ``pio-fvlm bench --help``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"bench": "speed benchmark: full vs pio vs ideal vs the authors' style"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: pio-fvlm <command> [options]\n\ncommands:")
        for name, what in commands.items():
            print(f"  {name:<8} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "bench":
        from .bench import main as bench_main

        bench_main(argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
