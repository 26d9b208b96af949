#!/usr/bin/env bash
# Fetch real photographs and artwork from Debian's wallpaper packages, without installing them:
# `apt-get download` + `dpkg -x`. Everything lands under data/debian/ (git-ignored).
#
#   bash scripts/fetch_photos.sh [PACKAGE ...]
#
# Default packages: plasma-workspace-wallpapers gnome-backgrounds mate-backgrounds ukui-wallpapers.
# Prints the number of images and pixels found. Needs apt (Debian/Ubuntu); no root needed for the
# download itself, but `apt-get update` must have been run once.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=("$@")
[ ${#pkgs[@]} -gt 0 ] || pkgs=(plasma-workspace-wallpapers gnome-backgrounds mate-backgrounds ukui-wallpapers)
mkdir -p data/debian/debs data/debian/root
if ! apt-cache show "${pkgs[0]}" >/dev/null 2>&1; then
  apt-get update -qq
fi
(
  cd data/debian/debs
  for p in "${pkgs[@]}"; do
    ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download -q "$p"
  done
)
for deb in data/debian/debs/*.deb; do
  dpkg -x "$deb" data/debian/root
done
find data/debian/root -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' -o -iname '*.webp' \) | sort > data/debian/images.txt
echo "$(wc -l < data/debian/images.txt) image files under data/debian/root (list: data/debian/images.txt)"
