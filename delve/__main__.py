"""Command line: ``python -m delve report RUN``, ``delve diagnose RUN`` and ``delve tail RUN``.

``RUN`` is the savefile given to the tracker (its CSV is ``RUN.csv``), the run
folder (``runs/exp/``, as a shell completes it) or the CSV's path.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from delve.analysis import MODES, diagnose, find_tail

_RUN_HELP = "savefile given to the tracker (its CSV is RUN.csv), the run folder, or the CSV itself"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="delve", description="Analyse runs recorded by delve's SaturationTracker.")
    commands = parser.add_subparsers(dest="command", required=True)

    report = commands.add_parser("report", help="write RUN/report.html: findings with their evidence, and figures")
    report.add_argument("run", help=_RUN_HELP)
    _inputs(report)
    report.add_argument("-o", "--output", help="HTML file to write (default: RUN/report.html)")
    report.add_argument("--statistics", nargs="+", metavar="KEY",
                        help="further logged statistics to draw (erank, pr...; default: every one the run logged)")
    _tail_options(report)

    diagnosis = commands.add_parser("diagnose", help="print the findings of delve.analysis.diagnose")
    diagnosis.add_argument("run", help=_RUN_HELP)
    _inputs(diagnosis)
    diagnosis.add_argument("--json", action="store_true", help="print the findings as a JSON list")
    _tail_options(diagnosis)

    tail = commands.add_parser("tail", help="print the layers of the low-saturation tail at the last epoch")
    tail.add_argument("run", help=_RUN_HELP)
    _tail_options(tail)
    return parser


def _inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--receptive-field", dest="receptive_fields", metavar="JSON",
                        help="receptive fields saved by delve.receptive_field.save_receptive_fields "
                             "(default: RUN/receptive_fields.json when present)")
    parser.add_argument("--probes", metavar="CSV", help="probe accuracies (default: RUN/probes.csv when present)")


def _tail_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, help="which saturation to judge (default: train)")
    parser.add_argument("--ratio", type=float, default=0.7,
                        help="tail layers sit at most RATIO x the median of the layers before them (default 0.7)")
    parser.add_argument("--min-gap", type=float, default=0.2, help="and at least MIN_GAP below it (default 0.2)")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0 on success, 1 on a bad run or argument).

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status.
    """
    arguments = _parser().parse_args(argv)
    try:
        if arguments.command == "report":
            from delve.report import report

            path = report(
                arguments.run, receptive_fields=arguments.receptive_fields, probes=arguments.probes,
                output=arguments.output, mode=arguments.mode, ratio=arguments.ratio, min_gap=arguments.min_gap,
                statistics=arguments.statistics,
            )
            print(path)
        elif arguments.command == "diagnose":
            findings = diagnose(arguments.run, probes=arguments.probes, mode=arguments.mode,
                                receptive_fields=arguments.receptive_fields, ratio=arguments.ratio,
                                min_gap=arguments.min_gap)
            if arguments.json:
                print(json.dumps([finding.to_dict() for finding in findings], indent=1))
            else:
                from delve.report import format_findings

                print(format_findings(findings))
        else:
            tail = find_tail(arguments.run, mode=arguments.mode, ratio=arguments.ratio, min_gap=arguments.min_gap)
            print("\n".join(tail) if tail else "no tail")
    except (FileNotFoundError, ValueError) as error:
        print(f"delve: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
