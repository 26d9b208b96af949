#!/usr/bin/env python3
"""Benchmark: one `tiny-cpu` training update in coda-rs against the identical update in PyTorch,
same machine, same run, same thread count (a benchmark, not a test).

    python scripts/bench_train.py [--threads 2] [--steps 12] [--what vae,adapt]

vae:   `coda train-vae --preset tiny-cpu` (KL-VAE from scratch: channels 32/64/128/128, 1 res-block,
       8 latent channels, GroupNorm 8, batch 8 of 64x64) against diffusers' AutoencoderKL with the
       same architecture: posterior sample, decode, 0.2 L1 + MSE + 1e-6 KL, backward, clip 10,
       AdamW (0.5, 0.9), EMA.
adapt: `coda adapt --preset tiny-cpu` on that VAE (frozen; LoRA rank 8 on conv1/conv2 in encoder
       and decoder; CODA quantizer V = 1024, d_a 32, scales 1..8) against the same model in PyTorch
       (scripts/reference/coda_quantizer.py LoRA + quantizer): posterior sample, quantizer with ST
       soft one-hot, L_q and entropy losses, decode, backward, clip, AdamW, EMA.
Our time per update is the `seconds` the trainer logs (data is prefetched on another thread);
both sides report the median over the updates after two warm-up ones.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "reference"))
BENCH = os.path.join(ROOT, ".bench", "train")
CODA = os.path.join(ROOT, "target", "release", "coda")


def make_data():
    from PIL import Image
    import numpy as np

    d = os.path.join(BENCH, "data")
    if os.path.isdir(d):
        return d
    os.makedirs(d)
    rng = np.random.default_rng(0)
    for i in range(32):
        a = (rng.random((96, 128, 3)) * 255).astype("uint8")
        Image.fromarray(a).save(os.path.join(d, f"{i}.png"))
    return d


def coda_step_seconds(args, role, extra, out):
    cmd = [CODA, role, "--preset", "tiny-cpu", "--data", make_data(), "--out", out,
           "--steps", str(args.steps), "--set", "log_every=1", "--set", "eval_every=0",
           "--set", "checkpoint_every=0", "--set", "eval_images=1"] + extra
    if os.path.exists(out):
        subprocess.run(["rm", "-rf", out], check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    secs = [json.loads(l)["train"]["seconds"] for l in open(os.path.join(out, "metrics.jsonl")) if '"train"' in l]
    secs = sorted(secs[2:])
    return secs[len(secs) // 2]


def torch_vae(torch):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=8,
        norm_num_groups=8, mid_block_add_attention=False,
    )


def torch_step_seconds(args, role):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    vae = torch_vae(torch)
    quantizer = None
    if role == "vae":
        params = list(vae.parameters())
    else:
        from coda_quantizer import CodaQuantizer, inject_lora

        vae.requires_grad_(False)
        inject_lora(vae, ["conv1", "conv2"], 8)
        quantizer = CodaQuantizer(1024, 8, 32)
        params = [p for n, p in vae.named_parameters() if "lora_layer" in n] + list(quantizer.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.5, 0.9), weight_decay=0.005)
    ema = [p.detach().clone() for p in params]
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    scales = [(s, s) for s in range(1, 9)]
    times = []
    for it in range(args.steps):
        t = time.perf_counter()
        post = vae.encode(x).latent_dist
        z = post.sample()
        loss = 0.0
        if quantizer is not None:
            _, f_hat, lq, lent, _ = quantizer(z, scales)
            z = f_hat
            loss = lq + 0.05 * lent
        else:
            kl = 0.5 * torch.sum(post.mean ** 2 + post.var - 1.0 - post.logvar) / (8 * 3 * 64 * 64)
            loss = 1e-6 * kl
        rec = vae.decode(z).sample
        loss = loss + 0.2 * F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(0.99).add_(p, alpha=0.01)
        times.append(time.perf_counter() - t)
    times = sorted(times[2:])
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--what", default="vae,adapt")
    args = ap.parse_args()
    if not os.path.exists(CODA):
        subprocess.run(["cargo", "build", "--release", "-p", "coda-cli"], cwd=ROOT, check=True)
    rows = []
    vae_dir = os.path.join(BENCH, "vae-run")
    for what in args.what.split(","):
        if what == "vae":
            ours = coda_step_seconds(args, "train-vae", [], vae_dir)
        else:
            if not os.path.exists(os.path.join(vae_dir, "vae", "config.json")):
                coda_step_seconds(args, "train-vae", [], vae_dir)
            tok = os.path.join(BENCH, "start-tok")
            subprocess.run([CODA, "tokenizer", "new", "--vae", os.path.join(vae_dir, "vae"), "--codebook-size", "1024",
                            "--lora-rank", "8", "--resolution", "64", "-o", tok], check=True, stdout=subprocess.DEVNULL)
            ours = coda_step_seconds(args, "adapt", ["--tokenizer", tok], os.path.join(BENCH, "adapt-run"))
        theirs = torch_step_seconds(args, what)
        rows.append((what, ours, theirs))
    print(f"one tiny-cpu training update (batch 8, 64x64), {args.threads} threads each, median of {args.steps - 2}:")
    print(f"{'role':8} {'coda-rs':>10} {'PyTorch':>10} {'ratio':>8}")
    for what, ours, theirs in rows:
        print(f"{what:8} {ours * 1e3:8.0f}ms {theirs * 1e3:8.0f}ms {ours / theirs:7.2f}x")


if __name__ == "__main__":
    main()
