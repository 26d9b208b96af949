#!/usr/bin/env python3
"""Write the parity fixtures that the Rust tests compare against.

Run by hand (needs torch, diffusers, safetensors, scikit-image, pytorch-fid, lpips from PyPI):

    pip install torch diffusers safetensors scikit-image pytorch-fid lpips
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
from coda_quantizer import CodaQuantizer, inject_lora  # noqa: E402
import dino_disc  # noqa: E402,F401
import torch.nn.functional as F  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
ROOT = os.path.join(FIXTURES, "vae")
QROOT = os.path.join(FIXTURES, "quantizer")
TROOT = os.path.join(FIXTURES, "tokenizer")
EROOT = os.path.join(FIXTURES, "evaluation")

MAR_SCALES = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
FLUX_SCALES = [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]


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


VAE_GRAD_KEYS = [
    "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
    "encoder.down.2.attn.0.q.weight", "encoder.mid.attn_1.proj_out.bias", "encoder.conv_out.weight",
    "quant_conv.weight", "post_quant_conv.bias", "decoder.mid.block_1.conv2.weight",
    "decoder.up.1.upsample.conv.weight", "decoder.up.0.block.1.norm2.bias", "decoder.conv_out.weight",
]


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
    # Training's backward through the whole VAE (every conv, GroupNorm+SiLU, attention,
    # up/downsampler): gradients of a probe loss on the decoded posterior mean (plus a logvar term)
    # with respect to the input and to a few weights.
    xg = x.clone().requires_grad_(True)
    mean, logvar = vae.encode(xg)
    probe = torch.randn((2, 3, 24, 32), generator=gen)
    loss = (vae.decode(mean) * probe).sum() + 0.1 * logvar.sum()
    loss.backward()
    named = dict(vae.named_parameters())
    grads = {f"grad.{k}": named[k].grad for k in VAE_GRAD_KEYS}
    save_io(os.path.join(ROOT, "ldm_grad.safetensors"), probe=probe, dx=xg.grad, **grads)


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


def resample_fixture():
    """area down and bicubic up for every size pair of both presets, plus non-square pairs, with
    the gradient of sum(out * g) with respect to the input."""
    gen = torch.Generator().manual_seed(33)
    out = {}
    pairs = [("area", (n, n), (s, s)) for n, lst in ((16, MAR_SCALES), (32, FLUX_SCALES)) for s in lst]
    pairs += [("bicubic", (s, s), (n, n)) for n, lst in ((16, MAR_SCALES), (32, FLUX_SCALES)) for s in lst]
    pairs += [("area", (16, 24), (5, 7)), ("bicubic", (5, 7), (16, 24)), ("area", (24, 16), (13, 9)),
              ("bicubic", (13, 9), (24, 16)), ("bicubic", (1, 1), (16, 16))]
    for mode, src, dst in pairs:
        x = torch.randn((2, 3) + src, generator=gen).requires_grad_(True)
        kw = {"align_corners": False} if mode == "bicubic" else {}
        y = F.interpolate(x, size=dst, mode=mode, **kw)
        g = torch.randn(y.shape, generator=gen)
        (y * g).sum().backward()
        key = f"{mode}_{src[0]}x{src[1]}_{dst[0]}x{dst[1]}"
        out.update({key + "_in": x.detach(), key + "_out": y.detach(), key + "_g": g, key + "_grad": x.grad})
    save_io(os.path.join(QROOT, "resample.safetensors"), **out)


def quantizer_fixture():
    """A small CODA quantizer (V=64, C=4, d_a=8, RMSNorm) on a random latent with overlapping-window
    scales: ids, f_hat, losses, and the gradients of a scalar of them."""
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(44)
    q = CodaQuantizer(64, 4, 8)
    with torch.no_grad():
        for n in ("norm_q", "norm_k"):
            getattr(q.attn, n).weight.copy_(1.0 + 0.3 * torch.randn(8, generator=gen))
    torch.save(contiguous(q.state_dict()), os.path.join(QROOT, "quantizer.pth"))
    f = (1.5 * torch.randn((2, 4, 8, 8), generator=gen)).requires_grad_(True)
    scales = [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8)]
    ids, f_hat, lq, lent, logits = q(f, scales)
    g = torch.randn(f_hat.shape, generator=gen)
    total = (f_hat * g).sum() + lq + 0.05 * lent
    total.backward()
    io = {"f": f.detach(), "f_hat": f_hat.detach(), "g": g, "loss_q": lq.detach().reshape(1),
          "loss_entropy": lent.detach().reshape(1), "grad_f": f.grad}
    for k, i in enumerate(ids):
        io[f"ids_{k}"] = i.to(torch.int64)
    for name, p in q.named_parameters():
        io["grad_" + name] = p.grad
    save_io(os.path.join(QROOT, "quantizer_io.safetensors"), **io)


def top2_gap(logits):
    """Per position, the gap between the two largest logits: where it is tiny, float rounding may
    legitimately pick either code."""
    top = logits.topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]).contiguous()


def tokenizer_fixture(name, vae, lora_modules, vocab, scale, shift, gen):
    """A reduced tokenizer in the reference's checkpoint format: the base VAE, `vae_ema.pth` (VAE with
    LoRACompatibleConv layers), `quantizer_ema.pth`, and reference ids, f_hat and decoded output."""
    targets = inject_lora(vae, lora_modules, rank=4)
    with torch.no_grad():
        for n, m in vae.named_modules():
            if n.endswith("lora_layer"):
                m.up.weight.copy_(0.05 * torch.randn(m.up.weight.shape, generator=gen))
    torch.save(contiguous(vae.state_dict()), os.path.join(TROOT, f"{name}_vae_ema.pth"))
    q = CodaQuantizer(vocab, 4, 8)
    with torch.no_grad():
        for n in ("norm_q", "norm_k"):
            getattr(q.attn, n).weight.copy_(1.0 + 0.3 * torch.randn(8, generator=gen))
    torch.save(contiguous(q.state_dict()), os.path.join(TROOT, f"{name}_quantizer_ema.pth"))
    x = torch.rand((2, 3, 32, 32), generator=gen) * 2 - 1
    scales = [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8)]
    with torch.no_grad():
        if hasattr(vae, "encoder") and hasattr(vae.encoder, "down_blocks"):
            mean = vae.encode(x).latent_dist.mean
            decode = lambda z: vae.decode(z).sample  # noqa: E731
        else:
            mean, _ = vae.encode(x)
            decode = vae.decode
        f = (mean - shift) * scale
        ids, f_hat, _, _, logits = q(f, scales)
        decoded = decode(f_hat / scale + shift)
    io = {"x": x, "f": f, "f_hat": f_hat, "decoded": decoded}
    for k, (i, lg) in enumerate(zip(ids, logits)):
        io[f"ids_{k}"] = i.to(torch.int64)
        io[f"gap_{k}"] = top2_gap(lg)
    save_io(os.path.join(TROOT, f"{name}_io.safetensors"), **io)
    print(f"{name}: {len(targets)} LoRA adapters")


def tokenizer_fixtures():
    from diffusers import AutoencoderKL

    gen = torch.Generator().manual_seed(55)
    # MAR structure: LDM layout, encoder attention at the coarsest level, quant convs, x0.2325.
    torch.manual_seed(5)
    cfg = dict(MAR_KL16, block_channels=[32, 32, 32], num_res_blocks=1, encoder_attention=[False, False, True],
               decoder_attention=[False] * 3, z_channels=4, latent_channels=4)
    mar = LdmVae(cfg).eval()
    randomise_norms(mar, gen)
    save_file(contiguous(mar.state_dict()), os.path.join(TROOT, "mar_base.safetensors"))
    tokenizer_fixture("mar", mar, ["conv1", "conv2", "upsample", "downsample"], 128, 0.2325, 0.0, gen)
    # FLUX structure: diffusers folder, no quant convs, (z - 0.1159) x 0.3611.
    torch.manual_seed(6)
    flux = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    randomise_norms(flux, gen)
    flux.save_pretrained(os.path.join(TROOT, "flux_base"), safe_serialization=True)
    tokenizer_fixture("flux", flux, ["conv1", "conv2"], 256, 0.3611, 0.1159, gen)


def metrics_fixture():
    """PSNR and SSIM of reconstruction pairs under both protocols, from scikit-image."""
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(66)
    out, expected = {}, {}
    for i, (h, w, noise) in enumerate([(37, 45, 0.05), (64, 64, 0.3), (11, 13, 0.01)]):
        x = rng.uniform(-1.05, 1.05, (3, h, w)).astype(np.float32)
        y = (x + noise * rng.standard_normal((3, h, w))).astype(np.float32)
        out[f"x_{i}"], out[f"y_{i}"] = torch.from_numpy(x), torch.from_numpy(y)
        for name, conv, rng_ in (
            ("uint8", lambda a: (np.clip((a + 1) / 2, 0, 1) * 255).astype(np.uint8), 255),
            ("float", lambda a: np.clip((a.astype(np.float64) + 1) / 2, 0, 1), 1),
        ):
            a, b = conv(x).transpose(1, 2, 0), conv(y).transpose(1, 2, 0)
            expected[f"psnr_{name}_{i}"] = float(peak_signal_noise_ratio(a, b, data_range=rng_))
            expected[f"ssim_{name}_{i}"] = float(structural_similarity(
                a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=rng_, channel_axis=-1))
    # Fréchet distance as pytorch-fid computes it (scipy sqrtm, eps offset when singular), on
    # feature sets with more and with fewer samples than dimensions.
    from scipy import linalg

    def frechet(mu1, s1, mu2, s2, eps=1e-6):
        covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
        covmean = covmean.real
        diff = mu1 - mu2
        return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))

    for i, (n, d) in enumerate([(400, 64), (200, 32), (40, 64)]):
        fa = rng.standard_normal((n, d)).astype(np.float32)
        fb = (0.8 * rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.5).astype(np.float32)
        out[f"feat_a_{i}"], out[f"feat_b_{i}"] = torch.from_numpy(fa), torch.from_numpy(fb)
        stats = [(f.astype(np.float64).mean(0), np.cov(f.astype(np.float64), rowvar=False)) for f in (fa, fb)]
        expected[f"fid_{i}"] = frechet(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
    save_io(os.path.join(EROOT, "pairs.safetensors"), **out)
    with open(os.path.join(EROOT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


def det_uniform(n, seed):
    """Uniform [-1, 1) float32 values from splitmix64 over (seed, index): the same stream is
    generated by coda::evaluation::inception::det_uniform, so a full-size random-weight Inception
    needs no weight file in the repository."""
    import numpy as np

    i = np.arange(n, dtype=np.uint64) + np.uint64(1)
    z = np.uint64(seed) + i * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return (2.0 * u - 1.0).astype(np.float32)


def det_inception_state(model):
    """Deterministic 'random' weights for every tensor, in sorted-name order (see det_uniform)."""
    import numpy as np

    sd = model.state_dict()
    out = {}
    for idx, k in enumerate(sorted(sd)):
        t = sd[k]
        if not t.is_floating_point():
            out[k] = t
            continue
        u = det_uniform(t.numel(), 1_000_003 * (idx + 1)).reshape(tuple(t.shape))
        if k.endswith("conv.weight") or k == "fc.weight":
            fan_in = int(np.prod(t.shape[1:]))
            v = u * np.sqrt(6.0 / fan_in)
        elif k.endswith("bn.weight"):
            v = 1.0 + 0.1 * u
        elif k.endswith("running_var"):
            v = 1.0 + 0.25 * (u + 1.0)
        else:  # bn.bias, running_mean, fc.bias
            v = 0.1 * u
        out[k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
    return out


def inception_fixture():
    """pytorch-fid's InceptionV3 (FID blocks, bilinear resize to 299, [-1, 1] normalisation) with
    deterministic random weights: input images and pool3 features."""
    import pytorch_fid.inception as I

    def structure():
        m = I._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        m.Mixed_5b = I.FIDInceptionA(192, pool_features=32)
        m.Mixed_5c = I.FIDInceptionA(256, pool_features=64)
        m.Mixed_5d = I.FIDInceptionA(288, pool_features=64)
        m.Mixed_6b = I.FIDInceptionC(768, channels_7x7=128)
        m.Mixed_6c = I.FIDInceptionC(768, channels_7x7=160)
        m.Mixed_6d = I.FIDInceptionC(768, channels_7x7=160)
        m.Mixed_6e = I.FIDInceptionC(768, channels_7x7=192)
        m.Mixed_7b = I.FIDInceptionE_1(1280)
        m.Mixed_7c = I.FIDInceptionE_2(2048)
        return m

    I.load_state_dict_from_url = lambda *a, **k: det_inception_state(structure())
    model = I.InceptionV3([I.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    gen = torch.Generator().manual_seed(77)
    x = torch.rand((2, 3, 64, 80), generator=gen)
    with torch.no_grad():
        feats = model(x)[0].reshape(2, 2048)
    save_io(os.path.join(EROOT, "inception_io.safetensors"), x=x, pool3=feats)


def dino_fixture():
    """The DINO discriminator on a tiny ViT (32 px, patch 8, 48 dims, 4 blocks, taps after blocks 1
    and 3): logits through the bicubic-resize, crop and area-resize input paths (three calls in a
    row, so the spectral-norm power iterations chain), input and head-parameter gradients of the
    first call, and the u/v vectors after each call."""
    from dino_disc import DinoDisc

    torch.manual_seed(7)
    d = DinoDisc(image=32, patch=8, dim=48, depth=4, heads=4, mlp=96, taps=(1, 3))
    with torch.no_grad():
        for name, p in d.vit.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if "norm" not in name else 0.1) + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))
        for h in d.heads:
            for name, p in h.named_parameters():
                if name.endswith("weight_orig"):
                    nn_init = torch.nn.init.trunc_normal_(torch.empty(p.shape), std=0.02)
                    p.copy_(nn_init)
                elif "bn" in name:
                    p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
                else:
                    p.copy_(torch.randn(p.shape) * 0.05)
    d.train()
    state = {k: v for k, v in contiguous(d.state_dict()).items()
             if "running" not in k and "num_batches" not in k}
    out = {}
    x1 = torch.rand(2, 3, 24, 24) * 2 - 1
    x1.requires_grad_(True)
    probe = torch.randn(2, 3 * 16)
    l1 = d(x1)
    (l1 * probe).sum().backward()
    out.update(x1=x1, probe=probe, logits1=l1, dx1=x1.grad)
    for name, p in d.heads.named_parameters():
        out[f"grad.heads.{name}"] = p.grad
    for name, b in d.heads.named_buffers():
        if name.endswith("weight_u") or name.endswith("weight_v"):
            out[f"after1.heads.{name}"] = b.clone()
    with torch.no_grad():
        x2 = torch.rand(2, 3, 40, 44) * 2 - 1
        out.update(x2=x2, logits2=d(x2, crop=(3, 5)))
        x3 = torch.rand(2, 3, 48, 48) * 2 - 1
        out.update(x3=x3, logits3=d(x3))
    os.makedirs(os.path.join(FIXTURES, "training"), exist_ok=True)
    save_file(state, os.path.join(FIXTURES, "training", "dino_weights.safetensors"))
    save_io(os.path.join(FIXTURES, "training", "dino_io.safetensors"), **out)
    print("dino: logits", tuple(l1.shape))


def lpips_fixture():
    """The `lpips` package's LPIPS(net='vgg') (v0.1: ScalingLayer, VGG16 relu1_2..relu5_3,
    unit-normalised features, 1x1 lin layers, spatial mean) with deterministic random weights."""
    import lpips
    import numpy as np

    model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).eval()
    sd = model.state_dict()
    names = sorted(k for k in sd if k.startswith("net.") or (k.startswith("lin") and not k.startswith("lins.")))
    new = {}
    for idx, k in enumerate(names):
        t = sd[k]
        u = det_uniform(t.numel(), 2_000_003 * (idx + 1)).reshape(tuple(t.shape))
        if k.startswith("lin"):
            v = 0.05 * (u + 1.0)
        elif k.endswith("weight"):
            v = u * np.sqrt(6.0 / int(np.prod(t.shape[1:])))
        else:
            v = 0.1 * u
        new[k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
    for kk in range(5):
        new[f"lins.{kk}.model.1.weight"] = new[f"lin{kk}.model.1.weight"]
    model.load_state_dict(new, strict=False)
    gen = torch.Generator().manual_seed(88)
    x = torch.rand((2, 3, 48, 56), generator=gen) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    with torch.no_grad():
        d = model(x, y).reshape(2)
    # The gradient that training's LPIPS term sends to the reconstruction.
    y_var = y.clone().requires_grad_(True)
    model(x, y_var).sum().backward()
    save_io(os.path.join(EROOT, "lpips_io.safetensors"), x=x, y=y, lpips=d, dy=y_var.grad)


if __name__ == "__main__":
    os.makedirs(ROOT, exist_ok=True)
    os.makedirs(QROOT, exist_ok=True)
    os.makedirs(TROOT, exist_ok=True)
    os.makedirs(EROOT, exist_ok=True)
    ldm_fixture()
    diffusers_fixture()
    preset_counts()
    resample_fixture()
    quantizer_fixture()
    tokenizer_fixtures()
    metrics_fixture()
    inception_fixture()
    lpips_fixture()
    dino_fixture()
    print("wrote", os.path.normpath(FIXTURES))
