"""Command line: ``python -m delve report RUN``, ``delve diagnose RUN`` and ``delve tail RUN``.

``RUN`` is the savefile given to the tracker (its CSV is ``RUN.csv``), the run
folder (``runs/exp/``, as a shell completes it) or the CSV's path.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from typing import Any, List, Optional, Sequence

from delve.analysis import MODES, Finding, diagnose, find_tail

_RUN_HELP = "savefile given to the tracker (its CSV is RUN.csv), the run folder, or the CSV itself"
_LABELS = {"warn": "WARN", "info": "INFO", "ok": "OK"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="delve", description="Analyse runs recorded by delve's SaturationTracker.")
    commands = parser.add_subparsers(dest="command", required=True)

    report = commands.add_parser("report", help="write RUN/report.html: findings with their evidence, and figures")
    report.add_argument("run", help=_RUN_HELP)
    _inputs(report)
    report.add_argument("-o", "--output", help="HTML file to write (default: RUN/report.html)")
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


def _numbers(values: Any) -> str:
    if isinstance(values, dict):
        return ", ".join(f"{key} {_numbers(value)}" for key, value in values.items() if value is not None)
    if isinstance(values, float):
        return f"{values:.0f}" if values.is_integer() and abs(values) >= 1 else f"{values:.3g}"
    if isinstance(values, (list, tuple)):
        return ", ".join(_numbers(value) for value in values)
    return "?" if values is None else str(values)


def _layer_numbers(name: str, numbers: dict) -> str:
    """``conv1  width 16 | train: sat. 0.438, idim 7, samples ? | eval: ...``"""
    parts = [f"width {_numbers(numbers.get('width'))}"] + (
        [numbers["kind"]] if numbers.get("kind") not in (None, "unknown") else [])
    for mode in MODES:
        if f"{mode}-saturation" in numbers:
            parts.append(f"{mode}: sat. {_numbers(numbers[f'{mode}-saturation'])}, idim "
                         f"{_numbers(numbers.get(f'{mode}-intrinsic-dimensionality'))}, samples "
                         f"{_numbers(numbers.get(f'{mode}-samples'))}")
    return f"{name}  " + " | ".join(parts)


def format_findings(findings: Sequence[Finding], width: Optional[int] = None) -> str:
    """The findings as plain text for a terminal: severity and kind, the message, then its evidence.

    Parameters
    ----------
    findings : list of Finding
        What :func:`delve.analysis.diagnose` returns.
    width : int, optional
        Line width; default: the terminal's (at most 100 columns).

    Returns
    -------
    str
    """
    width = width or min(shutil.get_terminal_size((100, 20)).columns, 100)
    indent = " " * 6
    blocks = []
    for finding in findings:
        head = f"{_LABELS[finding.severity]:<5} {finding.kind}" + (f": {', '.join(finding.layers)}" if finding.layers else "")
        lines = [head if len(head) <= width else head[: width - 2] + " …"]
        lines += textwrap.wrap(finding.message, width, initial_indent=indent, subsequent_indent=indent,
                               break_on_hyphens=False)
        extra = {k: v for k, v in finding.evidence.items() if k not in ("layers", "mode")}
        if extra:
            lines += textwrap.wrap("evidence: " + _numbers(extra), width, initial_indent=indent,
                                   subsequent_indent=indent + "  ", break_on_hyphens=False)
        for name, numbers in finding.evidence.get("layers", {}).items():
            lines += textwrap.wrap(_layer_numbers(name, numbers), width, initial_indent=indent + "  ",
                                   subsequent_indent=indent + "    ", break_on_hyphens=False)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no findings"


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
            )
            print(path)
        elif arguments.command == "diagnose":
            findings = diagnose(arguments.run, probes=arguments.probes, mode=arguments.mode,
                                receptive_fields=arguments.receptive_fields, ratio=arguments.ratio,
                                min_gap=arguments.min_gap)
            if arguments.json:
                print(json.dumps([finding.to_dict() for finding in findings], indent=1))
            else:
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
