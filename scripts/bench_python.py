"""Benchmark (not a test): the Python package's encode throughput against the `coda` CLI on the
same images, i.e. the overhead of the bindings. Both should be release builds of one commit:

    cargo build --release -p coda-cli && pip install .
    python scripts/bench_python.py [--images DIR] [--size 128] [--repeat 3]

Prints images/s of: the CLI (its own count, model and image reading, without process start and
tokenizer load), Python on the same files, Python on pre-decoded uint8 arrays, and the ratios.
"""

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import coda

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default=ROOT / "data/photos/val", type=Path)
    ap.add_argument("--size", default=128, type=int)
    ap.add_argument("--repeat", default=3, type=int)
    ap.add_argument("--cli", default=ROOT / "target/release/coda", type=Path)
    args = ap.parse_args()
    paths = sorted(
        p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
    )
    if not paths:
        raise SystemExit(f"no images under {args.images}")
    cpu = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        "?",
    )
    print(f"{len(paths)} images at {args.size} px; CPU {cpu}, {os.cpu_count()} threads")

    cli_rates = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.repeat):
            out = subprocess.run(
                [str(args.cli), "encode", "--size", str(args.size), "-o", f"{d}/t.safetensors"]
                + [str(p) for p in paths],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            cli_rates.append(float(re.search(r"([\d.]+) images/s", out).group(1)))
        cli_ids, _ = coda.load_tokens(f"{d}/t.safetensors")

    tok = coda.Tokenizer.from_pretrained("default")
    ids = tok.encode(paths, size=args.size)  # warm-up, and the same ids
    assert (ids == cli_ids).all(), "Python and CLI ids differ"
    rates_files, rates_arrays = [], []
    pixels = np.stack([coda.load_image(p, args.size) for p in paths])
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        tok.encode(paths, size=args.size)
        rates_files.append(len(paths) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        tok.encode(pixels)
        rates_arrays.append(len(paths) / (time.perf_counter() - t0))
    cli, files, arrays = max(cli_rates), max(rates_files), max(rates_arrays)
    print(f"CLI (coda encode)         {cli:7.2f} images/s")
    print(f"Python, same files        {files:7.2f} images/s  ({files / cli:.3f}x the CLI)")
    print(f"Python, uint8 arrays      {arrays:7.2f} images/s  ({arrays / cli:.3f}x the CLI)")


if __name__ == "__main__":
    main()
