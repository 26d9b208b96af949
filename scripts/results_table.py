#!/usr/bin/env python3
"""Print the README's results table (Markdown) from the runs and `coda eval` JSON files written
by scripts/reproduce_table.sh. Wall time of a run = from its config.toml (written at start) to its
exported model; CPU-hours = wall time x 2 threads (the runs use RAYON_NUM_THREADS=2)."""
import json
import os
import sys

runs = sys.argv[1] if len(sys.argv) > 1 else "runs"
rows = [
    ("Continuous KL-VAE (parent)", "vae", "vae/config.json"),
    ("CODA before adaptation (random codebook, LoRA = identity)", "start", None),
    ("CODA (adapted, 1x)", "coda", "tokenizer/config.json"),
    ("CODA (adapted, 6x)", "coda-6x", "tokenizer/config.json"),
    ("VQ from scratch, 1x", "vq-1x", "tokenizer/config.json"),
    ("VQ from scratch, 6x", "vq-6x", "tokenizer/config.json"),
    ("Multi-scale VQ from scratch, 1x", "msvq", "tokenizer/config.json"),
]


def steps_of(run):
    last = 0
    with open(os.path.join(runs, run, "metrics.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if "train" in d:
                last = max(last, d["step"])
    return last


print("| model | PSNR (dB) | SSIM | LPIPS | codebook usage (all scales) | tokens / bits per image | updates | CPU-hours |")
print("|---|---|---|---|---|---|---|---|")
for label, run, out in rows:
    e = os.path.join(runs, "eval", f"{run}.json")
    if not os.path.exists(e):
        continue
    r = json.load(open(e))
    m = r["metrics"]
    cb = m.get("codebook")
    usage = f"{cb['usage_all']:.1f}%" if cb else "-"
    model = r["model"]
    bits = f"{model['tokens_per_image']} / {model['bits_per_image']:.0f}" if model["kind"] == "tokenizer" else "continuous"
    lp = m.get("lpips")
    lp = f"{lp['value']:.4f}" if lp else "n/a"
    if out is None:
        steps, hours = "0", "0"
    else:
        start = os.path.getmtime(os.path.join(runs, run, "config.toml"))
        end = os.path.getmtime(os.path.join(runs, run, out))
        extra = " + parent" if run.startswith("coda") else ""
        steps, hours = f"{steps_of(run)}{extra}", f"{2 * (end - start) / 3600:.2f}{extra}"
    print(f"| {label} | {m['psnr']['uint8_truncated']:.2f} | {m['ssim']['uint8_truncated']:.4f} | {lp} | {usage} | {bits} "
          f"| {steps} | {hours} |")
