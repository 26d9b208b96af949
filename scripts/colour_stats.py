#!/usr/bin/env python3
"""Colour statistics of an image folder: mean RGB, the share of saturated pixels per hue sextant,
and how often pixels lie near given probe colours (within an RGB distance of 24/255).
Used to diagnose the colour shift of the first default tokenizer (README, Results).

    python3 scripts/colour_stats.py data/photos/train [--exclude stellarium,lomiri]
"""
import argparse
import colorsys
import os

import numpy as np
from PIL import Image

PROBES = {"green (40,160,60)": (40, 160, 60), "purple (150,120,200)": (150, 120, 200),
          "teal (20,120,110)": (20, 120, 110), "grey (128,128,128)": (128, 128, 128),
          "red (200,40,40)": (200, 40, 40), "blue (40,60,200)": (40, 60, 200)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--only", default="", help="comma-separated name prefixes to keep")
    a = ap.parse_args()
    keep = [p for p in a.only.split(",") if p]
    px = []
    for name in sorted(os.listdir(a.folder)):
        if keep and not any(name.startswith(k) for k in keep):
            continue
        im = Image.open(os.path.join(a.folder, name)).convert("RGB")
        im.thumbnail((128, 128))  # colour statistics need no detail
        px.append(np.asarray(im).reshape(-1, 3))
    x = np.concatenate(px).astype(np.float64)
    print(f"{len(px)} pictures, {len(x)} pixels (thumbnails)")
    print("mean RGB", np.round(x.mean(0), 1))
    hsv = np.array([colorsys.rgb_to_hsv(*(p / 255)) for p in x[:: max(1, len(x) // 200000)]])
    sat = hsv[hsv[:, 1] > 0.25]
    names = ["red", "yellow", "green", "cyan", "blue", "magenta"]
    bins = np.floor(((sat[:, 0] * 6) + 0.5) % 6).astype(int)
    share = np.bincount(bins, minlength=6) / len(hsv)
    print(f"saturated (S>0.25): {len(sat) / len(hsv):.1%} of pixels; by hue:",
          ", ".join(f"{n} {s:.1%}" for n, s in zip(names, share)))
    for k, c in PROBES.items():
        d = np.sqrt(((x - np.array(c)) ** 2).sum(1))
        print(f"  near {k}: {(d < 24).mean():.3%}")


if __name__ == "__main__":
    main()
