"""Seconds that ``loramix --help`` and each ``loramix <command> --help`` take, each a fresh process (the user's
wait: interpreter start, imports, parser, printing). Median of ``--repeat`` runs per command.

    python -m bench.cli_help [--repeat 3] [--json cli_help.json]

Runs ``python -m loramix.cli`` with this interpreter, so it measures the loramix that this python imports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from loramix.cli import COMMANDS


def help_commands() -> list[list[str]]:
    """Every help call a user can make: the top level, each command, each skills sub-command."""
    argv: list[list[str]] = [[]]
    for name, cmd in COMMANDS.items():
        argv.append([name])
        if isinstance(cmd, dict):
            argv += [[name, sub] for sub in cmd]
    return argv


def time_help(argv: list[str], repeat: int) -> float:
    """Median wall seconds of ``python -m loramix.cli ARGV --help``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "loramix.cli", *argv, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="runs per command (median reported)")
    p.add_argument("--json", default=None, help="also write {command: seconds} to this file")
    args = p.parse_args()
    result = {}
    for argv in help_commands():
        name = " ".join(["loramix", *argv, "--help"])
        result[name] = time_help(argv, args.repeat)
        print(f"{result[name]:6.2f} s  {name}", flush=True)
    print(f"{max(result.values()):6.2f} s  slowest")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
