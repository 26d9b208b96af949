#!/usr/bin/env python3
"""Print the README's results table (Markdown) from the runs and `coda eval` JSON files written
by scripts/reproduce_table.sh. Wall time of a run = the sum of its invocations' seconds in
RUNS/wall.jsonl (a resumed run has several); CPU-hours = the sum of seconds x threads of each
invocation ("threads" in wall.jsonl; 2, the machine's cores, where absent)."""
import json
import os
import sys

runs = sys.argv[1] if len(sys.argv) > 1 else "runs"
rows = [
    ("Continuous KL-VAE (parent)", "vae"),
    ("CODA before adaptation (random codebook, LoRA = identity)", "start"),
    ("CODA (adapted, 1x: 600 updates at 64 px)", "coda"),
    ("CODA, then 150 updates at 128 px", "coda-128"),
    ("CODA, then 600 more at 128 px", "coda-long"),
    ("CODA, then 1000 more at 128 px (lr 3e-4)", "coda-xl"),
    ("CODA, LoRA in the decoder only (1x: 600 updates at 64 px)", "coda-dec"),
    ("CODA, decoder-only LoRA, then 600 more at 128 px (lr 5e-4)", "coda-dec-128"),
    ("CODA, decoder-only LoRA, then 800 more at 128 px (lr 3e-4)", "coda-dec-xl"),
    ("Robust parent: the parent's decoder fine-tuned with latent noise", "vae-robust"),
    ("CODA on the robust parent (1x: 600 updates at 64 px)", "coda-robust-1x"),
    ("CODA on the robust parent, 128 px, quantizer warm-started from coda-dec-xl (the default)", "coda-robust"),
    ("VQ from scratch, 1x", "vq-1x"),
    ("VQ from scratch, 6x", "vq-6x"),
    ("Multi-scale VQ from scratch, 1x", "msvq"),
]


def steps_of(run):
    last = 0
    with open(os.path.join(runs, run, "metrics.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if "train" in d:
                last = max(last, d["step"])
    return last


def wall_seconds():
    """Per run: (wall seconds, CPU seconds)."""
    total = {}
    path = os.path.join(runs, "wall.jsonl")
    if os.path.exists(path):
        for line in open(path):
            d = json.loads(line)
            w, c = total.get(d["run"], (0, 0))
            total[d["run"]] = (w + d["seconds"], c + d["seconds"] * d.get("threads", 2))
    return total


def main():
    wall = wall_seconds()
    print("| model | PSNR (dB) | SSIM | LPIPS | colour error (mean / worst, /255) | codebook usage, val (train) "
          "| tokens / bits per image | updates | wall time | CPU-hours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, run in rows:
        e = os.path.join(runs, "eval", f"{run}.json")
        if not os.path.exists(e):
            continue
        r = json.load(open(e))
        m = r["metrics"]
        cb = m.get("codebook")
        usage = f"{cb['usage_all']:.1f}%" if cb else "-"
        tp = os.path.join(runs, "eval", f"{run}-train.json")
        if cb and os.path.exists(tp):
            usage += f" ({json.load(open(tp))['metrics']['codebook']['usage_all']:.1f}%)"
        model = r["model"]
        bits = (f"{model['tokens_per_image']} / {model['bits_per_image']:.0f}"
                if model["kind"] == "tokenizer" else "continuous")
        lp = m.get("lpips")
        lp = f"{lp['value']:.4f}" if lp else "n/a"
        col = m.get("colours")
        col = f"{col['mean_mae']:.1f} / {col['worst_mae']:.1f}" if col else "-"
        if run == "start":
            steps, wt, hours = "0", "0", "0"
        else:
            extra = {"coda": " + parent", "coda-128": " + 1x + parent",
                     "coda-long": " + 150 + 1x + parent",
                     "coda-xl": " + 600 + 150 + 1x + parent",
                     "coda-dec": " + parent", "coda-dec-128": " + 1x + parent",
                     "coda-dec-xl": " + 600 + 1x + parent",
                     "vae-robust": " + parent",
                     "coda-robust-1x": " + robust parent",
                     "coda-robust": " + 800 + 600 + 1x (coda-dec-xl) + robust parent"}.get(run, "")
            sec, cpu = wall.get(run, (None, None))
            wt = f"{sec / 60:.0f} min{extra}" if sec else "?"
            hours = f"{cpu / 3600:.2f}{extra}" if sec else "?"
            steps = f"{steps_of(run)}{extra}"
        print(f"| {label} | {m['psnr']['uint8_truncated']:.2f} | {m['ssim']['uint8_truncated']:.4f} | {lp} | {col} "
              f"| {usage} | {bits} | {steps} | {wt} | {hours} |")


if __name__ == "__main__":
    main()
