#!/usr/bin/env python3
"""Benchmark: coda-rs against PyTorch on the same machine, in the same run.

    python scripts/bench_vae.py [--size 256] [--batch 1,4] [--iters 3] [--threads 2]

Builds a FLUX-architecture VAE (diffusers AutoencoderKL, block_out_channels 128/256/512/512,
16 latent channels, random seeded weights), saves it as a diffusers folder under .bench/, then
times encode (posterior mean) and decode at the given size and batch sizes in PyTorch (eager,
fp32) and in `coda bench` (release build), each in its own process with the same thread count,
and prints the ratios. This is a benchmark, not a test: nothing asserts timings.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, ".bench", "flux-random")


def make_model():
    import torch
    from diffusers import AutoencoderKL

    if os.path.exists(os.path.join(MODEL, "config.json")):
        return
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    )
    vae.save_pretrained(MODEL, safe_serialization=True)


def median_ms(fn, iters):
    fn()
    ts = []
    for _ in range(max(1, iters)):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def torch_worker(size, batches, iters, threads):
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(threads)
    vae = AutoencoderKL.from_pretrained(MODEL).eval()
    out = []
    with torch.inference_mode():
        for b in batches:
            x = torch.rand(b, 3, size, size) * 2 - 1
            z = vae.encode(x).latent_dist.mean
            enc = median_ms(lambda: vae.encode(x).latent_dist.mean, iters)
            dec = median_ms(lambda: vae.decode(z).sample, iters)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out.append(dict(impl="pytorch", size=size, batch=b, encode_ms=enc, decode_ms=dec, peak_rss_mib=peak))
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    if a.torch_worker:
        return torch_worker(a.size, batches, a.iters, a.threads)

    import torch

    make_model()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "coda-cli"], cwd=ROOT, check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    jsonl = os.path.join(ROOT, ".bench", "coda.jsonl")
    subprocess.run([os.path.join(ROOT, "target", "release", "coda"), "bench", "--vae", MODEL,
                    "--size", str(a.size), "--batch", a.batch, "--iters", str(a.iters), "--json", jsonl],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    ours = [json.loads(l) for l in open(jsonl) if l.strip()]
    res = subprocess.run([sys.executable, __file__, "--torch-worker", "--size", str(a.size), "--batch", a.batch,
                          "--iters", str(a.iters), "--threads", str(a.threads)],
                         env=env, check=True, capture_output=True, text=True)
    ref = json.loads(res.stdout.strip().splitlines()[-1])

    print(f"FLUX-architecture VAE, random weights, {a.size}x{a.size}, fp32, {a.threads} threads, "
          f"median of {a.iters}; torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'stage':<8} {'batch':>5} {'coda-rs ms':>11} {'pytorch ms':>11} {'ratio':>7}")
    for o, r in zip(ours, ref):
        for stage in ("encode", "decode"):
            ratio = o[f"{stage}_ms"] / r[f"{stage}_ms"]
            print(f"{stage:<8} {o['batch']:>5} {o[stage + '_ms']:>11.1f} {r[stage + '_ms']:>11.1f} {ratio:>6.2f}x")
    print(f"peak RSS: coda-rs {ours[-1]['peak_rss_mib']:.0f} MiB, pytorch {ref[-1]['peak_rss_mib']:.0f} MiB "
          "(ratio > 1 means coda-rs is slower)")


if __name__ == "__main__":
    main()
