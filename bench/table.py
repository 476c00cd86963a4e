"""Markdown tables from bench/results/*.jsonl (the README's tables are made with this).

    python bench/table.py bench/results/cpu.jsonl [--bench sample] [--commit abc1234]
"""

import argparse
import json
from pathlib import Path


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--bench")
    parser.add_argument("--commit", help="only rows measured at this commit (default: the newest row's)")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    commit = args.commit or rows[-1]["commit"]
    rows = [r for r in rows if r["commit"] == commit and (args.bench is None or r["bench"] == args.bench)]
    print(f"device: {rows[0]['device']}, commit {commit}\n")
    print("| bench | implementation | shape | dtype | median ms | GB/s | GFLOP/s | of peak | vs baseline |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        print(f"| {r['bench']} | {r['impl']} | {shape} | {r['dtype']} | {r['median_ms']:.2f} | {fmt(r['gbps'], '.2f')} "
              f"| {fmt(r['gflops'], '.1f')} | {fmt(r['fraction_of_peak'], '.0%')} | {fmt(r['speedup_vs_baseline'], '.2f')}x |")


if __name__ == "__main__":
    main()
