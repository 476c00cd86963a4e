"""The dispatched CPU kernels of the installed module against a -march=native build of the
same sources: what the portable binary costs.

    python bench/isa_dispatch.py [--native-build DIR] [--rounds 4] [--out FILE] [--no-save]

Builds the extension once more with UNMASK_NATIVE_ARCH=ON and no CUDA (CMake, into
build/native-arch unless --native-build names a built one), then times the sample and
attention cases in child processes, alternating the installed module (its best
instruction set, then avx2 and portable for the record) and the native build round after
round, so a drift of the shared machine hits every build alike. Each case's time is the
median over rounds of each child's median; rows report the ratio native time / this
build's time (1.0 = as fast as -march=native).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_native(build_dir: Path) -> Path:
    import pybind11

    if not list(build_dir.glob("_C*.so")):
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", "-DUNMASK_NATIVE_ARCH=ON",
                        "-DUNMASK_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
                        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build_dir)], check=True, stdout=subprocess.DEVNULL)
    return next(build_dir.glob("_C*.so"))


def load_module_from(path: str) -> None:
    """Make `path` the unmask._C that `import unmask` finds (before unmask is imported)."""
    spec = importlib.util.spec_from_file_location("unmask._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["unmask._C"] = module


def cases():
    """(name, bench, shape, dtype, bytes or flops, run(i)) with inputs rotated past the caches."""
    import torch

    from unmask import ops
    from unmask.benchmarks.suites import random_logits, rotating_inputs

    found = []
    for n, vocab, dtype in ((256, 126464, torch.bfloat16), (256, 126464, torch.float32)):
        size = n * vocab * torch.tensor([], dtype=dtype).element_size()
        inputs = rotating_inputs(lambda i: random_logits(n, vocab, torch.device("cpu"), peaked=False, seed=i).to(dtype),
                                 size)
        found.append((f"sample {n}x{vocab} {dtype}".replace("torch.", ""), "sample",
                      {"N": n, "V": vocab, "T": 0.0}, dtype, size + n * 12,
                      lambda i, inputs=inputs, vocab=vocab: ops.sample(inputs[i % len(inputs)], banned=[vocab - 1],
                                                                       check=False)))
    q, k, v = (torch.randn(1, 1024, 32, 128) for _ in range(3))
    key_valid = torch.ones(1, 1024, dtype=torch.bool)
    key_valid[:, :128] = False
    flops = 4 * 32 * 1024 * 1024 * 128
    found.append(("attention none", "attention", {"B": 1, "L": 1024, "H": 32, "D": 128, "mask": "none"},
                  torch.float32, flops, lambda i: ops.attention(q, k, v)))
    found.append(("attention block32+pad", "attention", {"B": 1, "L": 1024, "H": 32, "D": 128, "mask": "block+pad"},
                  torch.float32, flops, lambda i: ops.attention(q, k, v, key_valid=key_valid, block_size=32)))
    return found


def child(args: argparse.Namespace) -> None:
    """Time every case in this process and print {case: median ms} as JSON."""
    if args.module:
        load_module_from(args.module)
    import torch

    from unmask import native
    from unmask.benchmarks.harness import median_seconds

    if args.isa:
        native.use_cpu_isa(args.isa)
    times = {name: median_seconds(run, torch.device("cpu"), reps=args.reps) * 1e3
             for name, _, _, _, _, run in cases()}
    print(json.dumps({"isa": native.cpu_isa(), "times": times}))


def parent(args: argparse.Namespace) -> None:
    import torch

    from unmask import native
    from unmask.benchmarks import harness

    native_module = build_native(args.native_build)
    builds = {"native (-march=native)": ["--module", str(native_module)]}
    for isa in native.runnable_cpu_isas():
        builds[f"dispatched ({isa})"] = ["--isa", isa]
    samples = {build: [] for build in builds}
    for round_index in range(args.rounds):
        for build, extra in builds.items():
            out = subprocess.run([sys.executable, __file__, "--child", "--reps", str(args.reps), *extra],
                                 capture_output=True, text=True, check=True)
            samples[build].append(json.loads(out.stdout.strip().splitlines()[-1])["times"])
            print(f"round {round_index + 1}: {build}: " + ", ".join(f"{k} {v:.2f} ms"
                                                                   for k, v in samples[build][-1].items()))
    rows = []
    native_build = "native (-march=native)"
    for name, bench, shape, dtype, work, _ in cases():
        native_ms = statistics.median(s[name] for s in samples[native_build])
        for build in builds:
            per_round = [s[name] for s in samples[build]]
            ms = statistics.median(per_round)
            amount = {"gbps": work / ms / 1e6} if bench == "sample" else {"gflops": work / ms / 1e6}
            rows.append(harness.Row(bench, build, shape, str(dtype).removeprefix("torch."), ms, **amount,
                                    speedup_vs_baseline=native_ms / ms,
                                    extra={"rounds_ms": per_round, "baseline": native_build,
                                           "compared": "isa dispatch vs -march=native"}))
    device = torch.device("cpu")
    print(f"device: {harness.device_name(device)}  commit: {harness.git_commit()}")
    print(harness.format_table(rows))
    if not args.no_save:
        out = args.out or ROOT / "bench" / "results" / "cpu.jsonl"
        harness.write_rows(rows, device, out)
        print(f"appended {len(rows)} rows to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--native-build", type=Path, default=ROOT / "build" / "native-arch")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--module", help=argparse.SUPPRESS)
    parser.add_argument("--isa", help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
