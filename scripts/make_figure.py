#!/usr/bin/env python3
"""The README picture: for a few validation photos, the original, the reconstruction by each
model, and CODA's coarse-to-fine strip (decoded from the first 1, 2, ..., K scales); below them
the solid-colour probe of `coda eval --colours`: each colour's patch over what CODA returns.

    python3 scripts/make_figure.py [--size 128] [--runs runs] [--out assets/readme/results.png]
                                   [--models VAE=vae/vae,CODA=coda-xl/tokenizer,...]

Needs the runs of scripts/reproduce_table.sh (models whose run is missing are left out) and
Pillow; calls `coda reconstruct`."""
import argparse
import os
import subprocess
import tempfile

from PIL import Image, ImageDraw

CODA = os.environ.get("CODA", "target/release/coda")
PHOTOS = ["summer_1am__images.png", "Kite__images.png", "desert__main.png", "Altai__images.png"]
MODELS = [("VAE", "--vae", "vae/vae"), ("CODA", "--tokenizer", "coda-xl/tokenizer"),
          ("VQ 1x", "--tokenizer", "vq-1x/tokenizer"), ("VQ 6x", "--tokenizer", "vq-6x/tokenizer"),
          ("MSVQ 1x", "--tokenizer", "msvq/tokenizer")]
# The 27 grid colours of the RGB cube and the three of `coda eval --colours`.
COLOURS = [(r, g, b) for r in (0, 128, 255) for g in (0, 128, 255) for b in (0, 128, 255)] + \
    [(40, 160, 60), (150, 120, 200), (20, 120, 110)]


def colour_rows(tmp, size, coda_args):
    """Each probe colour as a size x size patch, and CODA's reconstruction of it."""
    top, bottom = [], []
    for c in COLOURS:
        path = os.path.join(tmp, "colour_%d_%d_%d.png" % c)
        Image.new("RGB", (size, size), c).save(path)
        out = path[:-4] + "_recon.png"
        subprocess.run([CODA, "reconstruct", *coda_args, "-o", out, path], check=True,
                       stdout=subprocess.DEVNULL)
        # Shown at 64 px, whatever size they were tokenized at.
        top.append(Image.open(path).convert("RGB").resize((64, 64), Image.BOX))
        bottom.append(Image.open(out).convert("RGB").resize((64, 64), Image.BOX))
    return top, bottom


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--resize", type=int, default=144)
    ap.add_argument("--scale", type=int, default=1, help="pixel upscaling of the figure")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--out", default="assets/readme/results.png")
    ap.add_argument("--models", help="LABEL=RUN_PATH,... (a path ending in /vae is a VAE; the one "
                    "labelled CODA gets the coarse-to-fine strip and the colour probe)")
    a = ap.parse_args()
    s, z = a.size, a.scale
    chosen = MODELS
    if a.models:
        chosen = [(label, "--vae" if path.rstrip("/").endswith("vae") else "--tokenizer", path)
                  for label, path in (m.split("=", 1) for m in a.models.split(","))]
    models = [(label, [flag, os.path.join(a.runs, path)]) for label, flag, path in chosen
              if os.path.exists(os.path.join(a.runs, path, "config.json"))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        colours = colour_rows(tmp, 128, dict(models)["CODA"])  # the colour target's size
        swatch = 40  # shown smaller: a flat patch loses nothing
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
            for label, args in models:
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
    colour_h = label_h + 2 * swatch + gap
    H = label_h + len(rows) * (s * z + gap) + colour_h
    fig = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(fig)
    labels = ["original"] + [m for m, _ in models] + ["CODA, first 1..K scales"]
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
    y = label_h + len(rows) * (s * z + gap)
    d.text((2, y + 1), "solid colours at 128x128 (top) and CODA's reconstruction (bottom), shown at 64", fill="black")
    for i, (t, b) in enumerate(zip(*colours)):
        x = i * (swatch + 2)
        fig.paste(t.resize((swatch, swatch)), (x, y + label_h))
        fig.paste(b.resize((swatch, swatch)), (x, y + label_h + swatch))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    fig.save(a.out, optimize=True)
    print("wrote", a.out, fig.size)


if __name__ == "__main__":
    main()
