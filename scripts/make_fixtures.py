#!/usr/bin/env python3
"""Write the parity fixtures that the Rust tests compare against.

Run by hand (needs torch, diffusers, safetensors from PyPI):

    pip install torch diffusers safetensors
    python scripts/make_fixtures.py            # writes fixtures/vae/

Everything is random-weight and seeded, so re-running gives the same files up to PyTorch's
own version differences. The Rust tests never run Python; they read these files.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "reference"))
from ldm_vae import MAR_KL16, AutoencoderKL as LdmVae  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "vae")


def randomise_norms(model, gen):
    """PyTorch initialises GroupNorm to (1, 0); perturb it so the affine part is tested too."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))


def contiguous(sd):
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_io(path, **tensors):
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)


def ldm_fixture():
    """LDM layout with encoder-level attention (as MAR KL-16), decoder-level attention, quant convs
    and a non-square input: what diffusers cannot express."""
    cfg = dict(
        in_channels=3, out_channels=3, block_channels=[32, 32, 64], num_res_blocks=1,
        encoder_attention=[False, False, True], decoder_attention=[False, True, False],
        mid_attention=True, z_channels=8, latent_channels=4, quant_conv=True, post_quant_conv=True,
        norm_groups=32,
    )
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(11)
    vae = LdmVae(cfg).eval()
    randomise_norms(vae, gen)
    sd = contiguous(vae.state_dict())
    save_file(sd, os.path.join(ROOT, "ldm.safetensors"))
    torch.save(sd, os.path.join(ROOT, "ldm.pth"))
    x = torch.rand((2, 3, 24, 32), generator=gen) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        decoded = vae.decode(mean)
    save_io(os.path.join(ROOT, "ldm_io.safetensors"), x=x, mean=mean, logvar=logvar, decoded=decoded)
    with open(os.path.join(ROOT, "ldm_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def diffusers_fixture():
    """diffusers AutoencoderKL in the FLUX style (no quant convs, shift and scale), with a
    non-default GroupNorm group count that only config.json can tell."""
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(22)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ).eval()
    randomise_norms(vae, gen)
    folder = os.path.join(ROOT, "diffusers")
    vae.save_pretrained(folder, safe_serialization=True)
    torch.save(contiguous(vae.state_dict()), os.path.join(ROOT, "diffusers.pth"))
    x = torch.rand((2, 3, 16, 24), generator=gen) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        decoded = vae.decode(post.mean).sample
    save_io(os.path.join(ROOT, "diffusers_io.safetensors"), x=x, mean=post.mean, logvar=post.logvar,
            decoded=decoded)


def preset_counts():
    """Parameter counts of the full-size architectures, from diffusers and the LDM reference."""
    from diffusers import AutoencoderKL

    def count(m):
        return sum(p.numel() for p in m.parameters())

    common = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    flux = AutoencoderKL(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **common)
    sd = AutoencoderKL(latent_channels=4, **common)
    counts = {"flux": count(flux), "sd": count(sd), "mar-kl16": count(LdmVae(MAR_KL16))}
    with open(os.path.join(ROOT, "preset_param_counts.json"), "w") as f:
        json.dump(counts, f, indent=1)
    print("parameter counts", counts)


if __name__ == "__main__":
    os.makedirs(ROOT, exist_ok=True)
    ldm_fixture()
    diffusers_fixture()
    preset_counts()
    print("wrote", os.path.normpath(ROOT))
