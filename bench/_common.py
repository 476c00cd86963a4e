"""Shared command line for the bench/ scripts: device, output file, table."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from unmask.benchmarks import harness

RESULTS = Path(__file__).resolve().parent / "results"


def parse(description: str, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON lines file (default bench/results/<device type>.jsonl)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    return parser.parse_args()


def report(args: argparse.Namespace, rows, peaks: dict) -> None:
    device = torch.device(args.device)
    print(f"device: {harness.device_name(device)}  commit: {harness.git_commit()}")
    for key, value in peaks.items():
        print(f"measured {key.replace('_', ' ')}: {value:.1f}")
    print(harness.format_table(rows))
    if not args.no_save:
        out = args.out or RESULTS / f"{device.type}.jsonl"
        harness.write_rows(rows, device, out)
        print(f"appended {len(rows)} rows to {out}")
