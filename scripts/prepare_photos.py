#!/usr/bin/env python3
"""Turn the Debian wallpaper packages (fetched by scripts/fetch_photos.sh) into an ImageFolder
with a train/validation split by source picture.

    bash scripts/fetch_photos.sh && python3 scripts/prepare_photos.py [--side 512] [--val 15]

* One picture shipped at several sizes (plasma's contents/images/WxH.*, mate's Name_WxH.jpg)
  is kept once, at its largest resolution; KDE "screenshot" previews are dropped.
* Variants of one source (plasma's images_dark/, gnome's -d/-l) stay together, so the split is by
  source picture, never by crop: a source goes to validation when sha1(name) % 100 < --val.
* Sway ships one picture at several sizes and orientations (Name_WxH[_Portrait]): one source,
  kept once at its largest size.
* Stellarium's landscapes are panorama tiles with a transparent sky (RGBA): each tile is cut to
  its widest band of fully opaque rows (dropped when that band is under --min-side rows); the
  fog / illumination layers, grey masks and the small planet textures are not photos and are left
  out. All tiles of one landscape are one source.
* Each kept picture is downscaled (Lanczos) so that its shorter side is --side pixels, so that
  a training crop after the trainer's own resize holds a meaningful part of the picture.
Needs Pillow. Writes data/photos/{train,val}/<source>__<variant>.png and prints the counts.
"""
import argparse
import hashlib
import os
import re
import sys

try:
    from PIL import Image
except ImportError:
    sys.exit("prepare_photos.py needs Pillow: pip install pillow")

ROOT = "data/debian/root"


STELLARIUM_SKIP = re.compile(r"(fog|illum|-256\.png$)")


def source_and_variant(rel):
    m = re.match(r"usr/share/stellarium/landscapes/([^/]+)/(.+)\.\w+$", rel)
    if m:
        if STELLARIUM_SKIP.search(rel):
            return None
        return "stellarium-" + m.group(1), m.group(2)
    m = re.match(r"usr/share/wallpapers/([^/]+)/contents/(images|images_dark)/", rel)
    if m:
        return m.group(1), m.group(2)
    if "/contents/screenshot" in rel:
        return None
    stem = os.path.splitext(os.path.basename(rel))[0]
    stem = re.sub(r"_\d+x\d+(_Portrait)?$", "", stem)  # mate / sway: Name_3840x2160 -> Name
    m = re.match(r"(.+)-([dl])$", stem)  # gnome day/night variants
    if m:
        return m.group(1), m.group(2)
    return stem, "main"


def opaque_band(im):
    """The widest run of rows whose pixels are all opaque, as a crop of an RGB image; None when
    the image has no alpha, which means all of it."""
    if im.mode not in ("RGBA", "LA", "PA", "P"):
        return None
    a = im.convert("RGBA").getchannel("A")
    w, h = a.size
    data = a.tobytes()
    best, start = (0, 0), None
    for y in range(h + 1):
        full = y < h and min(data[y * w:(y + 1) * w]) == 255
        if full and start is None:
            start = y
        if not full and start is not None:
            if y - start > best[1] - best[0]:
                best = (start, y)
            start = None
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--val", type=int, default=15, help="percent of sources for validation")
    ap.add_argument("--out", default="data/photos")
    ap.add_argument("--min-side", type=int, default=128, help="smallest kept picture side")
    a = ap.parse_args()
    listing = os.path.join("data/debian/images.txt")
    if not os.path.exists(listing):
        sys.exit("run scripts/fetch_photos.sh first")
    best = {}
    for line in open(listing):
        path = line.strip()
        rel = os.path.relpath(path, ROOT)
        key = source_and_variant(rel)
        if key is None:
            continue
        try:
            with Image.open(path) as im:
                w, h = im.size
                band = opaque_band(im)
                if band is not None:
                    h = band[1] - band[0]
        except Exception as e:  # a broken file is reported, not fatal
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        if min(w, h) < a.min_side:
            continue
        if key not in best or w * h > best[key][1] * best[key][2]:
            best[key] = (path, w, h)
    counts = {"train": [0, 0, 0], "val": [0, 0, 0]}
    sources = {"train": set(), "val": set()}
    for (src, var), (path, w, h) in sorted(best.items()):
        split = "val" if int(hashlib.sha1(src.encode()).hexdigest(), 16) % 100 < a.val else "train"
        out_dir = os.path.join(a.out, split)
        os.makedirs(out_dir, exist_ok=True)
        with Image.open(path) as im:
            band = opaque_band(im)
            if band is not None:
                im = im.convert("RGBA").crop((0, band[0], w, band[1]))
            im = im.convert("RGB")
            s = a.side / min(w, h)
            if s < 1:
                im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{src}__{var}") + ".png"
            tmp = os.path.join(out_dir, "." + name)
            im.save(tmp, format="PNG")
            os.replace(tmp, os.path.join(out_dir, name))
            c = counts[split]
            c[0] += 1
            c[1] += w * h
            c[2] += im.size[0] * im.size[1]
        sources[split].add(src)
    for split in ("train", "val"):
        n, px, kept = counts[split]
        print(f"{split}: {n} pictures from {len(sources[split])} sources, "
              f"{px / 1e6:.1f} Mpx at full resolution, {kept / 1e6:.1f} Mpx after downscaling "
              f"to a {a.side}-px shorter side -> {os.path.join(a.out, split)}")


if __name__ == "__main__":
    main()
