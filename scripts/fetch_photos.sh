#!/usr/bin/env bash
# Fetch real photographs and artwork from Debian's wallpaper packages, without installing them:
# `apt-get download` + `dpkg -x`. Everything lands under data/debian/ (git-ignored).
#
#   bash scripts/fetch_photos.sh [PACKAGE ...]
#
# Default packages: the wallpaper packages plasma-workspace-wallpapers gnome-backgrounds
# mate-backgrounds ukui-wallpapers lomiri-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04
# sway-backgrounds, and stellarium-data (its landscape panoramas, usr/share/stellarium/landscapes/;
# its other images, star charts and textures, are left out of the list).
# Prints the number of images and pixels found. Needs apt (Debian/Ubuntu); no root needed for the
# download itself, but `apt-get update` must have been run once.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=("$@")
[ ${#pkgs[@]} -gt 0 ] || pkgs=(plasma-workspace-wallpapers gnome-backgrounds mate-backgrounds ukui-wallpapers
  lomiri-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 sway-backgrounds stellarium-data)
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
# Wallpapers and Stellarium's landscapes; Stellarium's sky textures, icons and star charts are not photos.
find data/debian/root -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' -o -iname '*.webp' \) \
  | grep -v '^data/debian/root/usr/share/stellarium/' | sort > data/debian/images.txt
find data/debian/root/usr/share/stellarium/landscapes -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' -o -iname '*.webp' \) \
  2>/dev/null | sort >> data/debian/images.txt
echo "$(wc -l < data/debian/images.txt) image files under data/debian/root (list: data/debian/images.txt)"
