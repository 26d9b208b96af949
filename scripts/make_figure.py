#!/usr/bin/env python3
"""The README picture: for a few validation photos, the original, the reconstruction by each
model, and CODA's coarse-to-fine strip (decoded from the first 1, 2, ..., K scales).

    python3 scripts/make_figure.py [--size 64] [--out assets/readme/results.png]

Needs the runs of scripts/reproduce_table.sh and Pillow; calls `coda reconstruct`."""
import argparse
import os
import subprocess
import tempfile

from PIL import Image, ImageDraw

CODA = os.environ.get("CODA", "target/release/coda")
PHOTOS = ["summer_1am__images.png", "Kite__images.png", "desert__main.png", "Altai__images.png"]
MODELS = [("VAE", ["--vae", "runs/vae/vae"]), ("CODA", ["--tokenizer", "runs/coda/tokenizer"]),
          ("VQ 1x", ["--tokenizer", "runs/vq-1x/tokenizer"]), ("VQ 6x", ["--tokenizer", "runs/vq-6x/tokenizer"])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--resize", type=int, default=160)
    ap.add_argument("--scale", type=int, default=2, help="pixel upscaling of the figure")
    ap.add_argument("--out", default="assets/readme/results.png")
    a = ap.parse_args()
    s, z = a.size, a.scale
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in PHOTOS:
            src = Image.open(os.path.join("data/photos/val", name)).convert("RGB")
            w, h = src.size
            k = a.resize / min(w, h)
            src = src.resize((round(w * k), round(h * k)), Image.LANCZOS)
            w, h = src.size
            left, top = (w - s) // 2, (h - s) // 2
            crop = src.crop((left, top, left + s, top + s))
            path = os.path.join(tmp, name)
            crop.save(path)
            tiles = [crop]
            strip = None
            for label, args in MODELS:
                out = os.path.join(tmp, f"{label.replace(' ', '')}_{name}")
                extra = ["--progressive"] if label == "CODA" else []
                subprocess.run([CODA, "reconstruct", *args, *extra, "-o", out, path], check=True,
                               stdout=subprocess.DEVNULL)
                tiles.append(Image.open(out).convert("RGB"))
                if label == "CODA":
                    strip = Image.open(out[:-4] + "_progressive.png").convert("RGB")
            rows.append((tiles, strip))
    n_tiles = len(rows[0][0])
    strip_w = rows[0][1].size[0]
    gap = 4
    label_h = 14
    W = (n_tiles * s + strip_w) * z + gap * (n_tiles + 1)
    H = label_h + len(rows) * (s * z + gap)
    fig = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(fig)
    labels = ["original"] + [m for m, _ in MODELS] + ["CODA, first 1..K scales"]
    x = 0
    for i, lab in enumerate(labels):
        d.text((x + 2, 1), lab, fill="black")
        x += (s * z + gap) if i < n_tiles else 0
    for r, (tiles, strip) in enumerate(rows):
        y = label_h + r * (s * z + gap)
        x = 0
        for t in tiles:
            fig.paste(t.resize((s * z, s * z), Image.NEAREST), (x, y))
            x += s * z + gap
        fig.paste(strip.resize((strip.size[0] * z, s * z), Image.NEAREST), (x, y))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    fig.save(a.out, optimize=True)
    print("wrote", a.out, fig.size)


if __name__ == "__main__":
    main()
