#!/usr/bin/env bash
# Reproduce the README's results table: a continuous KL-VAE trained here on the Debian photos,
# CODA adaptation of it, and VQ baselines trained from scratch with the same architecture and
# codebook size (1x and 6x the adaptation's updates, and the multi-scale variant).
#
#   bash scripts/reproduce_table.sh            # everything, ~2.5 CPU-hours on 2 cores
#   STEPS_VAE=200 STEPS=40 bash scripts/reproduce_table.sh   # a quick smoke run
#
# Runs land in runs/ (git-ignored); evaluation JSON in runs/eval/. Each stage is skipped when
# its output exists, so the script can be re-run after an interruption (a stage itself resumes
# with `coda ... --resume --out DIR`).
set -euo pipefail
cd "$(dirname "$0")/.."
CODA=${CODA:-target/release/coda}
STEPS_VAE=${STEPS_VAE:-2000}
STEPS=${STEPS:-400}
CODEBOOK=${CODEBOOK:-1024}
COMMON=(--preset tiny-cpu --data data/photos/train --val data/photos/val --set resize=160)
[ -x "$CODA" ] || cargo build --release -p coda-cli
[ -d data/photos/train ] || { bash scripts/fetch_photos.sh && python3 scripts/prepare_photos.py; }
mkdir -p runs/eval

# Run a trainer into OUT, or continue it when OUT already holds checkpoints (an interrupted run).
train() {
  local cmd=$1 out=$2
  shift 2
  if [ -d "$out/checkpoints" ]; then
    "$CODA" "$cmd" --resume --out "$out"
  else
    "$CODA" "$cmd" "$@" --out "$out"
  fi
}

[ -f runs/vae/vae/config.json ] || train train-vae runs/vae "${COMMON[@]}" --steps "$STEPS_VAE"
[ -f runs/start/config.json ] || "$CODA" tokenizer new --vae runs/vae/vae --codebook-size "$CODEBOOK" \
  --lora-rank 8 --resolution 64 -o runs/start
[ -f runs/coda/tokenizer/config.json ] || train adapt runs/coda "${COMMON[@]}" --tokenizer runs/start --steps "$STEPS"
[ -f runs/coda-6x/tokenizer/config.json ] || train adapt runs/coda-6x "${COMMON[@]}" --tokenizer runs/start --steps $((6 * STEPS)) \
  --set eval_every=300 --set checkpoint_every=300
[ -f runs/vq-1x/tokenizer/config.json ] || train train-vq runs/vq-1x "${COMMON[@]}" --steps "$STEPS" \
  --set model.codebook_size="$CODEBOOK"
[ -f runs/msvq/tokenizer/config.json ] || train train-vq runs/msvq "${COMMON[@]}" --steps "$STEPS" \
  --set model.codebook_size="$CODEBOOK" --set model.scales=10
[ -f runs/vq-6x/tokenizer/config.json ] || train train-vq runs/vq-6x "${COMMON[@]}" --steps $((6 * STEPS)) \
  --set model.codebook_size="$CODEBOOK"

EVAL=(--data data/photos/val --size 64 --resize 160 --batch 4)
"$CODA" eval --vae runs/vae/vae "${EVAL[@]}" --json runs/eval/vae.json
"$CODA" eval --tokenizer runs/start "${EVAL[@]}" --json runs/eval/start.json
for r in coda coda-6x vq-1x vq-6x msvq; do
  "$CODA" eval --tokenizer runs/$r/tokenizer "${EVAL[@]}" --json runs/eval/$r.json
done
python3 scripts/results_table.py runs
