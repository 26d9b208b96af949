#!/usr/bin/env python3
"""Benchmark: one training update in coda-rs against the identical update in PyTorch, same
machine, same run, same thread count (a benchmark, not a test).

    python scripts/bench_train.py [--threads 2] [--steps 12] [--flux-steps 5] [--rounds 2]
                                  [--what vae,adapt,flux-adapt] [--torch-modes nchw,channels_last]
                                  [--isa best|avx2]

vae:   `coda train-vae --preset tiny-cpu` (KL-VAE from scratch: channels 32/64/128/128, 1 res-block,
       8 latent channels, GroupNorm 8, batch 8 of 64x64) against diffusers' AutoencoderKL with the
       same architecture: posterior sample, decode, 0.2 L1 + MSE + 1e-6 KL, backward, clip 10,
       AdamW (0.5, 0.9), EMA.
adapt: `coda adapt --preset tiny-cpu` on that VAE (frozen; LoRA rank 8 on conv1/conv2 in encoder
       and decoder; CODA quantizer V = 1024, d_a 32, scales 1..8) against the same model in PyTorch
       (scripts/reference/coda_quantizer.py LoRA + quantizer): posterior sample, quantizer with ST
       soft one-hot, L_q and entropy losses, decode, backward, clip, AdamW, EMA.
flux-adapt: the same `adapt` update at FLUX size: bench.py's random FLUX-size VAE (.bench/flux-random,
       128/256/512/512, mid attention) with its V = 65536 tokenizer (LoRA rank 32, scales 1..32),
       batch 1 of 256x256 (no discriminator, no LPIPS on either side).
Our time per update is the `seconds` the trainer logs (data is prefetched on another thread);
PyTorch's is wall time around the same update. Each side reports the median over its updates
after two warm-up ones; the sides alternate for --rounds rounds and each keeps its best round (the
machine's load drifts between runs). PyTorch runs in each of --torch-modes (channels_last: model
and input in channels_last, often faster on CPU) and the ratio is against its best mode. Peak RSS
is each process's maximum resident set. --isa avx2 caps both sides (CODA_CPU_ISA;
ATEN_CPU_CAPABILITY + ONEDNN_MAX_CPU_ISA).
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
FLUX_VAE = os.path.join(ROOT, ".bench", "flux-random")
FLUX_TOK = os.path.join(ROOT, ".bench", "flux-tok")
FLUX_SCALES = [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]


def make_data(size=(96, 128), name="data"):
    from PIL import Image
    import numpy as np

    d = os.path.join(BENCH, name)
    if os.path.isdir(d):
        return d
    os.makedirs(d)
    rng = np.random.default_rng(0)
    for i in range(32):
        a = (rng.random((*size, 3)) * 255).astype("uint8")
        Image.fromarray(a).save(os.path.join(d, f"{i}.png"))
    return d


def run_measured(cmd, env):
    """Run cmd; returns its peak RSS in MiB (its own, from wait4)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return out, usage.ru_maxrss / 1024


def steps_of(args, what):
    return args.flux_steps if what == "flux-adapt" else args.steps


def coda_step(args, env, role, extra, out, preset="tiny-cpu", data=None, steps=None):
    cmd = [CODA, role, "--preset", preset, "--data", data or make_data(), "--out", out,
           "--steps", str(steps or args.steps), "--set", "log_every=1", "--set", "eval_every=0",
           "--set", "checkpoint_every=0", "--set", "eval_images=1"] + extra
    if os.path.exists(out):
        subprocess.run(["rm", "-rf", out], check=True)
    _, rss = run_measured(cmd, env)
    secs = [json.loads(l)["train"]["seconds"] for l in open(os.path.join(out, "metrics.jsonl")) if '"train"' in l]
    secs = sorted(secs[2:])
    return secs[len(secs) // 2], rss


def torch_vae(torch):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=8,
        norm_num_groups=8, mid_block_add_attention=False,
    )


def torch_worker(args):
    """One PyTorch process: the update of args.torch_worker in args.torch_mode; prints JSON."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    role, mode = args.torch_worker, args.torch_mode
    quantizer = None
    if role == "flux-adapt":
        from diffusers import AutoencoderKL
        from coda_quantizer import CodaQuantizer, inject_lora

        vae = AutoencoderKL.from_pretrained(FLUX_VAE)
        vae.requires_grad_(False)
        inject_lora(vae, ["conv1", "conv2"], 32)
        quantizer = CodaQuantizer(65536, 16, 32)
        scales = [(s, s) for s in FLUX_SCALES]
        batch, size, scale, shift = 1, 256, vae.config.scaling_factor, vae.config.shift_factor or 0.0
    else:
        vae = torch_vae(torch)
        batch, size, scale, shift = 8, 64, 1.0, 0.0
        scales = [(s, s) for s in range(1, 9)]
        if role == "adapt":
            from coda_quantizer import CodaQuantizer, inject_lora

            vae.requires_grad_(False)
            inject_lora(vae, ["conv1", "conv2"], 8)
            quantizer = CodaQuantizer(1024, 8, 32)
    if quantizer is not None:
        params = [p for n, p in vae.named_parameters() if "lora_layer" in n] + list(quantizer.parameters())
    else:
        params = list(vae.parameters())
    x = torch.rand(batch, 3, size, size) * 2 - 1
    if mode == "channels_last":
        vae = vae.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.5, 0.9), weight_decay=0.005)
    ema = [p.detach().clone() for p in params]
    times = []
    for it in range(args.steps):
        t = time.perf_counter()
        post = vae.encode(x).latent_dist
        z = post.sample()
        loss = 0.0
        if quantizer is not None:
            _, f_hat, lq, lent, _ = quantizer((z - shift) * scale, scales)
            z = f_hat / scale + shift
            loss = lq + 0.05 * lent
        else:
            kl = 0.5 * torch.sum(post.mean ** 2 + post.var - 1.0 - post.logvar) / x.numel()
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
    print(json.dumps(dict(seconds=times[len(times) // 2])))


def torch_step(args, env, role, mode):
    cmd = [sys.executable, __file__, "--torch-worker", role, "--torch-mode", mode, "--threads", str(args.threads),
           "--steps", str(steps_of(args, role))]
    out, rss = run_measured(cmd, env)
    return json.loads(out.strip().splitlines()[-1])["seconds"], rss


def prepare(args, env, what):
    """The coda command line of one row (building what it starts from)."""
    vae_dir = os.path.join(BENCH, "vae-run")
    if what == "vae":
        return lambda: coda_step(args, env, "train-vae", [], vae_dir)
    if what == "adapt":
        if not os.path.exists(os.path.join(vae_dir, "vae", "config.json")):
            coda_step(args, env, "train-vae", [], vae_dir)
        tok = os.path.join(BENCH, "start-tok")
        subprocess.run([CODA, "tokenizer", "new", "--vae", os.path.join(vae_dir, "vae"), "--codebook-size", "1024",
                        "--lora-rank", "8", "--resolution", "64", "-o", tok], check=True, stdout=subprocess.DEVNULL)
        return lambda: coda_step(args, env, "adapt", ["--tokenizer", tok], os.path.join(BENCH, "adapt-run"))
    if what == "flux-adapt":
        if not os.path.exists(os.path.join(FLUX_TOK, "config.json")):
            subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--arch", "flux", "--batch",
                            "1", "--precision", "f32", "--torch-modes", "nchw", "--iters", "1", "--no-build"],
                           check=True, env=env, stdout=subprocess.DEVNULL)
        data = make_data((288, 320), "data-288")
        extra = ["--tokenizer", FLUX_TOK, "--batch", "1", "--set", "accum=1", "--set", "disc=\"none\"",
                 "--set", "lpips_weight=0"]
        return lambda: coda_step(args, env, "adapt", extra, os.path.join(BENCH, "flux-adapt-run"),
                                 preset="flux-65536", data=data, steps=args.flux_steps)
    raise SystemExit(f"unknown row {what}")


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--flux-steps", type=int, default=5, help="updates of the flux-adapt row (median of all but 2)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--what", default="vae,adapt,flux-adapt")
    ap.add_argument("--torch-modes", default="nchw,channels_last")
    ap.add_argument("--isa", choices=["best", "avx2"], default="best")
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    ap.add_argument("--torch-mode", default="nchw", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        return torch_worker(args)
    if not os.path.exists(CODA):
        subprocess.run(["cargo", "build", "--release", "-p", "coda-cli"], cwd=ROOT, check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    if args.isa != "best":
        env.update(CODA_CPU_ISA=args.isa, ATEN_CPU_CAPABILITY=args.isa, ONEDNN_MAX_CPU_ISA=args.isa.upper())
    import torch

    path = subprocess.run([CODA, "bench", "--print-isa"], env=env, capture_output=True, text=True).stdout.strip()
    print(f"{cpu_name()}; coda-rs kernel path: {path or 'unknown'}; PyTorch {torch.__version__} "
          f"(ATEN_CPU_CAPABILITY={env.get('ATEN_CPU_CAPABILITY', 'default')}, "
          f"ONEDNN_MAX_CPU_ISA={env.get('ONEDNN_MAX_CPU_ISA', 'default')})")
    modes = args.torch_modes.split(",")
    rows = []
    for what in args.what.split(","):
        ours_run = prepare(args, env, what)
        ours, theirs = [], {m: [] for m in modes}
        for _ in range(args.rounds):
            ours.append(ours_run())
            for m in modes:
                theirs[m].append(torch_step(args, env, what, m))
        best_ours = min(ours)
        best = {m: min(v) for m, v in theirs.items()}
        rss_ours = max(r for _, r in ours)
        rows.append((what, best_ours, best, rss_ours))
    print(f"one training update, {args.threads} threads each, median of {args.steps - 2} updates "
          f"({args.flux_steps - 2} for flux-adapt), best of "
          f"{args.rounds} alternating rounds; ratio = coda-rs / fastest PyTorch mode (< 1: coda-rs faster)")
    head = f"{'row':11} {'coda-rs':>9}" + "".join(f" {'pt ' + m:>17}" for m in modes) + f" {'ratio':>6}   peak RSS MiB (coda-rs / PyTorch)"
    print(head)
    for what, (ours, rss), best, _ in rows:
        fastest = min(best.values(), key=lambda v: v[0])
        cells = "".join(f" {best[m][0] * 1e3:15.0f}ms" for m in modes)
        rss_t = " / ".join(f"{best[m][1]:.0f}" for m in modes)
        print(f"{what:11} {ours * 1e3:7.0f}ms{cells} {ours / fastest[0]:5.2f}x   {rss:.0f} / {rss_t}")


if __name__ == "__main__":
    main()
