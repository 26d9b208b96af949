"""PyTorch reference of the LDM-family KL-VAE (Stable Diffusion, FLUX ae, MAR KL-16), written
from the architecture description in shared/docs/coda-method.md §3, with the original LDM
module names (encoder.down.{i}.block.{j}, ..., decoder.up.{i} indexed from full resolution).

diffusers has no class with encoder-level attention (MAR KL-16), hence this file. It is used by
scripts/make_fixtures.py to write parity fixtures; it is never needed by the Rust tests.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def norm(c, groups):
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.norm = norm(c, groups)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        k = k.reshape(b, c, hh * ww)
        w = torch.bmm(q, k) * (int(c) ** (-0.5))
        w = F.softmax(w, dim=2)
        v = v.reshape(b, c, hh * ww)
        h = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c, attention, groups):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        if attention:
            self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x):
        x = self.block_1(x)
        if hasattr(self, "attn_1"):
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg["block_channels"], cfg["norm_groups"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, 1, 1)
        self.down = nn.ModuleList()
        cin = ch[0]
        for i, cout in enumerate(ch):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg["num_res_blocks"]):
                level.block.append(ResnetBlock(cin, cout, g))
                cin = cout
                if cfg["encoder_attention"][i]:
                    level.attn.append(AttnBlock(cout, g))
            if i + 1 != len(ch):
                level.downsample = Downsample(cout)
            self.down.append(level)
        self.mid = Mid(ch[-1], cfg["mid_attention"], g)
        self.norm_out = norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg["z_channels"], 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg["block_channels"], cfg["norm_groups"]
        self.conv_in = nn.Conv2d(cfg["z_channels"], ch[-1], 3, 1, 1)
        self.mid = Mid(ch[-1], cfg["mid_attention"], g)
        self.up = nn.ModuleList()
        cin = ch[-1]
        levels = []
        for i in reversed(range(len(ch))):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg["num_res_blocks"] + 1):
                level.block.append(ResnetBlock(cin, ch[i], g))
                cin = ch[i]
                if cfg["decoder_attention"][i]:
                    level.attn.append(AttnBlock(ch[i], g))
            if i != 0:
                level.upsample = Upsample(ch[i])
            levels.insert(0, level)
        for level in levels:
            self.up.append(level)
        self.norm_out = norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, 1, 1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        z, l = cfg["z_channels"], cfg["latent_channels"]
        if cfg["quant_conv"]:
            self.quant_conv = nn.Conv2d(2 * z, 2 * l, 1)
        if cfg["post_quant_conv"]:
            self.post_quant_conv = nn.Conv2d(l, z, 1)

    def encode(self, x):
        moments = self.encoder(x)
        if hasattr(self, "quant_conv"):
            moments = self.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def decode(self, z):
        if hasattr(self, "post_quant_conv"):
            z = self.post_quant_conv(z)
        return self.decoder(z)


MAR_KL16 = dict(
    in_channels=3, out_channels=3, block_channels=[128, 128, 256, 256, 512], num_res_blocks=2,
    encoder_attention=[False, False, False, False, True], decoder_attention=[False] * 5,
    mid_attention=True, z_channels=16, latent_channels=16, quant_conv=True, post_quant_conv=True,
    norm_groups=32,
)
