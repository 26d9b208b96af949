#!/usr/bin/env python3
"""Write LPIPS (VGG) weights for coda-rs: torchvision's ImageNet VGG16 features plus the `lpips`
package's linear layers (`vgg.pth`, the same file taming-transformers' `vgg_lpips` uses, md5
d507d7349b931f0638a25a48a722f98a), under the `lpips` package's names.

    pip install lpips torch torchvision safetensors
    python scripts/convert_lpips.py lpips-vgg.safetensors      # downloads the VGG16 weights once

Then: `coda eval ... --lpips lpips-vgg.safetensors`.
"""
import sys

import lpips
from safetensors.torch import save_file


def main():
    dst = sys.argv[1] if len(sys.argv) > 1 else "lpips-vgg.safetensors"
    model = lpips.LPIPS(net="vgg", pretrained=True, verbose=False).eval()
    keep = {k: v.contiguous().clone() for k, v in model.state_dict().items()
            if k.startswith("net.") or (k.startswith("lin") and not k.startswith("lins."))}
    save_file(keep, dst)
    print(f"wrote {len(keep)} tensors to {dst}")


if __name__ == "__main__":
    main()
