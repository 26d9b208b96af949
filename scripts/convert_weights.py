#!/usr/bin/env python3
"""Convert a PyTorch checkpoint (legacy or zip .pth/.pt/.ckpt) to safetensors, for the weights
coda-rs reads but that are distributed in PyTorch's old pickle format:

    # pytorch-fid's FID Inception weights (for `coda eval --inception`)
    python scripts/convert_weights.py pt_inception-2015-12-05-6726825d.pth inception-fid.safetensors

    # any state dict nested under a key
    python scripts/convert_weights.py checkpoint.pth out.safetensors --key state_dict

Only tensors are kept (made contiguous; names unchanged). Needs torch and safetensors.
"""
import argparse

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--key", help="take the state dict under this key")
    a = ap.parse_args()
    sd = torch.load(a.src, map_location="cpu", weights_only=False)
    if a.key:
        sd = sd[a.key]
    tensors = {k: v.detach().contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    skipped = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    save_file(tensors, a.dst)
    print(f"wrote {len(tensors)} tensors to {a.dst}" + (f"; skipped non-tensors: {skipped}" if skipped else ""))


if __name__ == "__main__":
    main()
