#!/usr/bin/env python3
"""Benchmark: coda-rs against PyTorch on the same machine, in the same run.

    python scripts/bench.py [--what vae,tokenizer] [--size 256] [--batch 1,4] [--iters 3] [--threads 2]

Builds a FLUX-architecture VAE (diffusers AutoencoderKL, block_out_channels 128/256/512/512,
16 latent channels, random seeded weights) as a diffusers folder under .bench/, and a FLUX-size
tokenizer on it (`coda tokenizer new`, V = 65536, the paper's 32x32 scales). Then it times, in
PyTorch (eager, fp32) and in `coda bench` (release build), each in its own process with the
same thread count:
  vae:       VAE encode (posterior mean) and decode;
  tokenizer: full tokenizer encode (image -> ids), the quantizer assignment alone, and decode.
The PyTorch tokenizer is the straightforward implementation (full (N, V) logits, argmax, gather)
on the very same weights. It prints the ratios. A benchmark, not a test: nothing asserts timings.
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
TOKENIZER = os.path.join(ROOT, ".bench", "flux-tok")
CODA = os.path.join(ROOT, "target", "release", "coda")
FLUX_SCALES = [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]


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


class TorchTokenizer:
    """CODA inference in plain PyTorch: the reference quantizer's math, argmax instead of softmax."""

    def __init__(self, vae, q, scale, shift):
        import math

        self.vae, self.scale, self.shift = vae, scale, shift

        def rms(x, w):
            return x * (x.pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt() * w

        e = q["codebooks.weight"]
        self.rms, self.q = rms, q
        self.keys = rms(e @ q["attn.to_k.weight"].T + q["attn.to_k.bias"], q["attn.norm_k.weight"]) / math.sqrt(
            q["attn.to_k.weight"].shape[0])
        self.values = e @ q["attn.to_v.weight"].T + q["attn.to_v.bias"]

    def assign_all(self, f, scales):
        import torch.nn.functional as F

        b, c, hh, ww = f.shape
        r, f_hat, ids = f, 0, []
        for s in scales:
            qm = F.interpolate(r, size=(s, s), mode="area")
            qs = self.rms(qm.permute(0, 2, 3, 1).reshape(-1, c) @ self.q["attn.to_q.weight"].T + self.q["attn.to_q.bias"],
                          self.q["attn.norm_q.weight"])
            idx = (qs @ self.keys.T).argmax(-1)
            z = self.values[idx].reshape(b, s, s, c).permute(0, 3, 1, 2)
            up = F.interpolate(z, size=(hh, ww), mode="bicubic", align_corners=False)
            f_hat, r = f_hat + up, r - up
            ids.append(idx.reshape(b, s, s))
        return ids

    def encode(self, x, scales):
        f = (self.vae.encode(x).latent_dist.mean - self.shift) * self.scale
        return self.assign_all(f, scales)

    def decode(self, ids, hw):
        import torch.nn.functional as F

        f_hat = 0
        for idx in ids:
            b, s, _ = idx.shape
            z = self.values[idx.reshape(-1)].reshape(b, s, s, -1).permute(0, 3, 1, 2)
            f_hat = f_hat + F.interpolate(z, size=hw, mode="bicubic", align_corners=False)
        return self.vae.decode(f_hat / self.scale + self.shift).sample


def torch_worker(what, size, batches, iters, threads):
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    vae = AutoencoderKL.from_pretrained(MODEL).eval()
    out = []
    with torch.inference_mode():
        if what == "tokenizer":
            w = load_file(os.path.join(TOKENIZER, "model.safetensors"))
            q = {k[len("quantizer."):]: v for k, v in w.items() if k.startswith("quantizer.")}
            tok = TorchTokenizer(vae, q, 0.3611, 0.1159)
        for b in batches:
            x = torch.rand(b, 3, size, size) * 2 - 1
            if what == "vae":
                z = vae.encode(x).latent_dist.mean
                enc = median_ms(lambda: vae.encode(x).latent_dist.mean, iters)
                dec = median_ms(lambda: vae.decode(z).sample, iters)
                rec = dict(encode_ms=enc, decode_ms=dec)
            else:
                f = (vae.encode(x).latent_dist.mean - 0.1159) * 0.3611
                ids = tok.encode(x, FLUX_SCALES)
                rec = dict(tok_encode_ms=median_ms(lambda: tok.encode(x, FLUX_SCALES), iters),
                           assign_ms=median_ms(lambda: tok.assign_all(f, FLUX_SCALES), iters),
                           tok_decode_ms=median_ms(lambda: tok.decode(ids, (size // 8, size // 8)), iters))
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out.append(dict(impl="pytorch", size=size, batch=b, peak_rss_mib=peak, **rec))
    print(json.dumps(out))


def compare(what, a, env):
    jsonl = os.path.join(ROOT, ".bench", f"coda-{what}.jsonl")
    target = ["--tokenizer", TOKENIZER] if what == "tokenizer" else ["--vae", MODEL]
    subprocess.run([CODA, "bench", *target, "--size", str(a.size), "--batch", a.batch, "--iters", str(a.iters),
                    "--json", jsonl], env=env, check=True, stdout=subprocess.DEVNULL)
    ours = [json.loads(line) for line in open(jsonl) if line.strip()]
    res = subprocess.run([sys.executable, __file__, "--torch-worker", what, "--size", str(a.size), "--batch", a.batch,
                          "--iters", str(a.iters), "--threads", str(a.threads)],
                         env=env, check=True, capture_output=True, text=True)
    ref = json.loads(res.stdout.strip().splitlines()[-1])
    stages = ("encode", "decode") if what == "vae" else ("tok_encode", "assign", "tok_decode")
    for o, r in zip(ours, ref):
        for stage in stages:
            ratio = o[f"{stage}_ms"] / r[f"{stage}_ms"]
            name = f"{what} {stage.replace('tok_', '')}"
            print(f"{name:<20} {o['batch']:>5} {o[stage + '_ms']:>11.1f} {r[stage + '_ms']:>11.1f} {ratio:>6.2f}x")
    print(f"{'':<20} peak RSS: coda-rs {ours[-1]['peak_rss_mib']:.0f} MiB, pytorch {ref[-1]['peak_rss_mib']:.0f} MiB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="vae,tokenizer")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    if a.torch_worker:
        return torch_worker(a.torch_worker, a.size, batches, a.iters, a.threads)

    import torch

    make_model()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "coda-cli"], cwd=ROOT, check=True)
    if not os.path.exists(os.path.join(TOKENIZER, "config.json")):
        subprocess.run([CODA, "tokenizer", "new", "--vae", MODEL, "--codebook-size", "65536", "--scales",
                        ",".join(map(str, FLUX_SCALES)), "-o", TOKENIZER], check=True, stdout=subprocess.DEVNULL)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    print(f"FLUX-architecture VAE / V=65536 tokenizer, random weights, {a.size}x{a.size}, fp32, {a.threads} threads, "
          f"median of {a.iters}; torch {torch.__version__}, {os.cpu_count()} CPUs. ratio > 1: coda-rs is slower")
    print(f"{'stage':<20} {'batch':>5} {'coda-rs ms':>11} {'pytorch ms':>11} {'ratio':>7}")
    for what in a.what.split(","):
        compare(what, a, env)


if __name__ == "__main__":
    main()
