#!/usr/bin/env python3
"""Benchmark: coda-rs against PyTorch on the same machine, in the same run.

    python scripts/bench.py [--arch mar,flux] [--batch 1,8] [--size 256] [--iters 3] [--rounds 1]
                            [--precision f32,bf16x3,bf16] [--threads 2] [--isa avx2]
                            [--torch-modes nchw,channels_last,bf16]

Two architectures, random seeded weights, saved under .bench/ (diffusers AutoencoderKL folders):
  mar:  MAR KL-16 size, ch 128, mult 1,1,2,2,4 (f16), 16 latent channels, and a V=16384
        tokenizer on it (`coda tokenizer new`, scales 1,2,3,4,5,6,8,10,13,16 at 16x16);
  flux: FLUX size, 128/256/512/512 (f8), 16 latent channels, V=65536, scales up to 32x32.
For each architecture and batch, coda-rs (`coda bench`, release build, one process per precision)
and PyTorch (eager fp32, one process) time, each with the same thread count: VAE encode
(posterior mean), the quantizer assignment over all scales, VAE decode, full tokenizer encode
(image -> ids) and full tokenizer decode (ids -> image). The PyTorch tokenizer is the
straightforward implementation (full (N, V) logits, argmax, gather) on the very same weights.

PyTorch runs in each of --torch-modes, one process each: `nchw` (its default layout, f32),
`channels_last` (f32, model and input in channels_last, often faster on CPU) and `bf16`
(channels_last under torch.autocast("cpu", dtype=torch.bfloat16)). Ratios are taken against the
best f32 mode per stage ("PyTorch f32 at its best") and, for our bf16 modes, against the best of
all its modes. --isa avx2 caps the instruction set: CODA_CPU_ISA for coda-rs (our loops and the
GEMMs of our convolutions and code assignment, which then run the `gemm` crate's FMA kernels;
only candle's own matmuls, the VAE's mid-block attention, still pick AVX-512 by themselves),
ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA for PyTorch. The first printed line names the CPU and
both sides' kernel paths.

Printed: the times, the ratios (ours / PyTorch: below 1 = coda-rs faster), and each process's
peak RSS; for the bf16 precisions also their effect against f32 (identical tokens, decoded image
max |diff| and PSNR on a real photo). A benchmark, not a test: nothing asserts timings.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODA = os.environ.get("CODA", os.path.join(ROOT, "target", "release", "coda"))
PHOTO = os.path.join(ROOT, "assets", "photos", "ladybird.jpg")
ARCHS = {
    "mar": dict(blocks=(128, 128, 256, 256, 512), codebook=16384, scales=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
                scale=0.2325, shift=0.0, quant_conv=True),
    "flux": dict(blocks=(128, 256, 512, 512), codebook=65536, scales=[1, 2, 3, 4, 6, 9, 13, 18, 24, 32],
                 scale=0.3611, shift=0.1159, quant_conv=False),
}


def model_dir(arch):
    return os.path.join(ROOT, ".bench", f"{arch}-random")


def tokenizer_dir(arch):
    return os.path.join(ROOT, ".bench", f"{arch}-tok")


def make_model(arch):
    import torch
    from diffusers import AutoencoderKL

    if os.path.exists(os.path.join(model_dir(arch), "config.json")):
        return
    a = ARCHS[arch]
    torch.manual_seed(0)
    n = len(a["blocks"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=a["blocks"], layers_per_block=2, latent_channels=16,
        use_quant_conv=a["quant_conv"], use_post_quant_conv=a["quant_conv"], scaling_factor=a["scale"],
        shift_factor=a["shift"] or None,
    )
    vae.save_pretrained(model_dir(arch), safe_serialization=True)


def median_ms(fn, iters, sync=lambda: None):
    fn()
    sync()
    ts = []
    for _ in range(max(1, iters)):
        t = time.perf_counter()
        fn()
        sync()
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


def torch_worker(arch, size, batch, iters, threads, device="cpu", mode="nchw"):
    import contextlib
    import functools

    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    if cuda:
        # PyTorch eager at full f32 precision, as coda-rs runs (no TF32).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    global median_ms
    median_ms = functools.partial(median_ms, sync=torch.cuda.synchronize if cuda else (lambda: None))
    a = ARCHS[arch]
    scales = a["scales"]
    vae = AutoencoderKL.from_pretrained(model_dir(arch)).eval().to(device)
    layout = torch.channels_last if mode in ("channels_last", "bf16") else torch.contiguous_format
    vae = vae.to(memory_format=layout)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if mode == "bf16" \
        else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        w = load_file(os.path.join(tokenizer_dir(arch), "model.safetensors"), device=device)
        q = {k[len("quantizer."):]: v for k, v in w.items() if k.startswith("quantizer.")}
        tok = TorchTokenizer(vae, q, a["scale"], a["shift"])
        x = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=layout)
        f = (vae.encode(x).latent_dist.mean - a["shift"]) * a["scale"]
        ids = tok.encode(x, scales)
        hw = tuple(f.shape[-2:])
        z = f / a["scale"] + a["shift"]
        rec = dict(vae_encode_ms=median_ms(lambda: vae.encode(x).latent_dist.mean, iters),
                   assign_ms=median_ms(lambda: tok.assign_all(f, scales), iters),
                   vae_decode_ms=median_ms(lambda: vae.decode(z).sample, iters),
                   tok_encode_ms=median_ms(lambda: tok.encode(x, scales), iters),
                   tok_decode_ms=median_ms(lambda: tok.decode(ids, hw), iters))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        rec["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(dict(impl="pytorch", mode=mode, size=size, batch=batch, peak_rss_mib=peak,
                          cpu_capability=torch.backends.cpu.get_cpu_capability(), **rec)))


STAGES = ("vae_encode", "assign", "vae_decode", "tok_encode", "tok_decode")


def run_ours(arch, batch, precision, a, env):
    jsonl = os.path.join(ROOT, ".bench", f"coda-{arch}-{batch}-{precision}.jsonl")
    image = [] if precision == "f32" else ["--image", PHOTO]
    subprocess.run([CODA, "--device", a.device, "bench", "--tokenizer", tokenizer_dir(arch), "--size", str(a.size), "--batch", str(batch),
                    "--iters", str(a.iters), "--precision", precision, *image, "--json", jsonl],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(open(jsonl).read().strip().splitlines()[-1])


def run_torch(arch, batch, a, env, mode):
    res = subprocess.run([sys.executable, __file__, "--torch-worker", arch, "--size", str(a.size), "--batch",
                          str(batch), "--iters", str(a.iters), "--threads", str(a.threads), "--device", a.device,
                          "--torch-mode", mode],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def fastest(records):
    """One record from several runs of the same job: each `_ms` value the fastest, peak RSS the
    largest, everything else from the first run."""
    out = dict(records[0])
    for key in out:
        if key.endswith("_ms"):
            out[key] = min(r[key] for r in records)
        elif key.startswith("peak_"):
            out[key] = max(r[key] for r in records)
    out["rounds"] = len(records)
    return out


def best_of(refs, stage_ms):
    """Per stage, the fastest of the given PyTorch runs: {stage_key: (ms, mode)}."""
    out = {}
    for key in stage_ms:
        ms, mode = min((r[key], r["mode"]) for r in refs)
        out[key] = (ms, mode)
    return out


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def markdown(files):
    """README rows: | arch | batch | stage | PyTorch ms | each precision: ms (ratio) |."""
    names = dict(vae_encode="VAE encode", assign="assignment, all scales", vae_decode="VAE decode",
                 tok_encode="tokenizer encode", tok_decode="tokenizer decode")
    for f in files:
        for r in json.load(open(f)):
            refs, ours = r["pytorch"], r["coda"]
            refs = refs if isinstance(refs, list) else [dict(refs, mode="nchw")]
            f32 = [x for x in refs if x["mode"] != "bf16"]
            for stage in STAGES + ("encode+decode",):
                get = (lambda x: x["tok_encode_ms"] + x["tok_decode_ms"]) if stage == "encode+decode" \
                    else (lambda x, s=stage: x[f"{s}_ms"])
                best32 = min(f32, key=get)
                bestall = min(refs, key=get)
                cells = []
                for p, o in ours.items():
                    ref = best32 if p == "f32" else bestall
                    cells.append(f"{get(o):.0f} ({get(o) / get(ref):.2f}x)")
                label = f"**{stage}**" if stage == "encode+decode" else names[stage]
                torch_cells = " | ".join(f"{get(x):.0f}" for x in refs)
                print(f"| {r['arch'].upper()} | {r['batch']} | {label} | {torch_cells} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="mar,flux")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternating runs of each side; each stage's fastest is reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="f32,bf16x3,bf16",
                    help="coda-rs precisions to time (bf16x3 needs AMX, bf16 AMX or AVX512_BF16; skipped without)")
    ap.add_argument("--json", default=os.path.join(ROOT, ".bench", "bench.json"), help="all results, as JSON")
    ap.add_argument("--table", help="print saved results (comma-separated --json files) as a Markdown table, and exit")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for both sides on the GPU (a `cuda` build of coda)")
    ap.add_argument("--no-build", action="store_true", help="use the coda binary as it is (CODA=path overrides it)")
    ap.add_argument("--isa", choices=["best", "avx2", "avx512"], default="best",
                    help="restrict both sides to one instruction set (CODA_CPU_ISA; ATEN_CPU_CAPABILITY + "
                         "ONEDNN_MAX_CPU_ISA)")
    ap.add_argument("--torch-modes", default="nchw,channels_last,bf16",
                    help="PyTorch runs: nchw and channels_last (f32), bf16 (autocast, channels_last)")
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    ap.add_argument("--torch-mode", default="nchw", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.table:
        return markdown(a.table.split(","))
    batches = [int(b) for b in a.batch.split(",")]
    if a.torch_worker:
        return torch_worker(a.torch_worker, a.size, batches[0], a.iters, a.threads, a.device, a.torch_mode)

    import torch

    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "coda-cli"], cwd=ROOT, check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    if a.isa != "best":
        env.update(CODA_CPU_ISA=a.isa, ATEN_CPU_CAPABILITY=a.isa, ONEDNN_MAX_CPU_ISA=a.isa.upper().replace(
            "AVX512", "AVX512_CORE"))
    # bf16x3 needs AMX; bf16 AMX or AVX512_BF16 (vdpbf16ps); neither under an --isa cap.
    flags = open("/proc/cpuinfo").read()
    runs = {"f32": True, "bf16x3": "amx_bf16" in flags,
            "bf16": "amx_bf16" in flags or "avx512_bf16" in flags}
    precisions = [p for p in a.precision.split(",")
                  if p == "f32" or (runs[p] and a.isa == "best" and a.device == "cpu")]
    for p in a.precision.split(","):
        if p not in precisions:
            print(f"SKIP coda-rs precision {p}: not on this CPU / --isa / device")
    modes = a.torch_modes.split(",")
    ours_path = subprocess.run([CODA, "bench", "--print-isa"], env=env, capture_output=True, text=True).stdout.strip()
    print(f"{cpu_name()}; coda-rs kernel path: {ours_path or 'unknown'}; PyTorch {torch.__version__} "
          f"(ATEN_CPU_CAPABILITY={env.get('ATEN_CPU_CAPABILITY', 'default')}, "
          f"ONEDNN_MAX_CPU_ISA={env.get('ONEDNN_MAX_CPU_ISA', 'default')})")
    print(f"random weights, {a.size}x{a.size}, {a.threads} threads each, median of {a.iters} after a warm-up; "
          f"PyTorch modes {', '.join(modes)}. ratio = coda-rs / PyTorch time (< 1: coda-rs faster), against "
          f"PyTorch's best f32 mode for our f32 and its best mode of all for our bf16 modes")
    head = f"{'arch':<5} {'batch':>5} {'stage':<11}" + "".join(f" {'pt ' + m:>16}" for m in modes)
    for p in precisions:
        head += f" {p + ' ms':>11} {'ratio':>6}"
    print(head)
    results = []
    for arch in a.arch.split(","):
        make_model(arch)
        if not os.path.exists(os.path.join(tokenizer_dir(arch), "config.json")):
            c = ARCHS[arch]
            subprocess.run([CODA, "tokenizer", "new", "--vae", model_dir(arch), "--codebook-size", str(c["codebook"]),
                            "--scales", ",".join(map(str, c["scales"])), "-o", tokenizer_dir(arch)],
                           check=True, stdout=subprocess.DEVNULL)
        for b in batches:
            # Alternating rounds, each stage's fastest per side: one noisy round (this kind of VM
            # swings 20-80% between runs) then moves both sides' numbers less.
            torch_rounds, our_rounds = [], []
            for _ in range(a.rounds):
                torch_rounds.append([run_torch(arch, b, a, env, m) for m in modes])
                our_rounds.append({p: run_ours(arch, b, p, a, env) for p in precisions})
            refs = [fastest([r[i] for r in torch_rounds]) for i in range(len(modes))]
            ours = {p: fastest([r[p] for r in our_rounds]) for p in precisions}
            results.append(dict(arch=arch, batch=b, pytorch=refs, coda=ours, cpu=cpu_name(), isa=a.isa))
            f32_refs = [r for r in refs if r["mode"] != "bf16"] or refs
            for stage in STAGES + ("encode+decode",):
                get = (lambda r: r["tok_encode_ms"] + r["tok_decode_ms"]) if stage == "encode+decode" \
                    else (lambda r, s=stage: r[f"{s}_ms"])
                line = f"{arch:<5} {b:>5} {stage:<11}" + "".join(f" {get(r):>16.1f}" for r in refs)
                for p in precisions:
                    ref = min(map(get, f32_refs if p == "f32" else refs))
                    line += f" {get(ours[p]):>11.1f} {get(ours[p]) / ref:>5.2f}x"
                print(line)
            line = f"{arch:<5} {b:>5} {'peak RSS':<11}" + "".join(f" {r['peak_rss_mib']:>12.0f} MiB" for r in refs)
            for p in precisions:
                line += f" {ours[p]['peak_rss_mib']:>7.0f} MiB {'':>6}"
            print(line)
            enc = "bf16x3" if "bf16x3" in ours else "f32"
            if "bf16" in ours and enc in ours:
                # The token-preserving pair: encode in bf16x3 (AMX) or f32, decode in bf16.
                mixed = ours[enc]["tok_encode_ms"] + ours["bf16"]["tok_decode_ms"]
                both = min(r["tok_encode_ms"] + r["tok_decode_ms"] for r in refs)
                print(f"{arch:<5} {b:>5} encode {enc} + decode bf16 (tokens as f32): {mixed:.1f} ms vs PyTorch's "
                      f"fastest {both:.1f} ms, {mixed / both:.2f}x")
            for p in precisions[1:]:
                o = ours[p]
                print(f"{arch:<5} {b:>5} {p} vs f32 on {os.path.basename(PHOTO)}: tokens {100 * o['token_agreement']:.2f}% "
                      f"identical, decoded image max |diff| {o['decode_max_abs_vs_f32']:.2e}, "
                      f"PSNR {o['decode_psnr_vs_f32_db']:.1f} dB")
            sys.stdout.flush()
    with open(a.json, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
