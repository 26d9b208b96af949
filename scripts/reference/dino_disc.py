"""The DINO ViT-S/16 feature discriminator of VAR / CODA (coda-method.md §6.4), written from the
description: frozen ViT (no final LayerNorm, tanh-GELU, k-bias zeroed), taps after the position
embedding and after every third block, and per tap a head of spectral-norm Conv1d + BatchNorm
(train mode) + LeakyReLU with a circular k=9 residual. Parametrised so that tests can use a tiny
ViT; `DinoDisc()` is the real ViT-S/16 (384 dims, 12 blocks, 6 heads, 224 px)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    def __init__(self, image=224, patch=16, dim=384, depth=12, heads=6, mlp=1536):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp) for _ in range(depth)])


class Head(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv_in = spectral_norm(nn.Conv1d(dim, dim, 1), eps=1e-12)
        self.bn_in = nn.BatchNorm1d(dim, eps=1e-6)
        self.res_conv = spectral_norm(nn.Conv1d(dim, dim, 9, padding=4, padding_mode="circular"), eps=1e-12)
        self.res_bn = nn.BatchNorm1d(dim, eps=1e-6)
        self.conv_out = spectral_norm(nn.Conv1d(dim, 1, 1), eps=1e-12)

    def forward(self, x):
        x = F.leaky_relu(self.bn_in(self.conv_in(x)), 0.2)
        x = (F.leaky_relu(self.res_bn(self.res_conv(x)), 0.2) + x) / math.sqrt(2)
        return self.conv_out(x)


class DinoDisc(nn.Module):
    def __init__(self, image=224, patch=16, dim=384, depth=12, heads=6, mlp=1536, taps=(2, 5, 8, 11)):
        super().__init__()
        self.image = image
        self.vit = ViT(image, patch, dim, depth, heads, mlp)
        self.vit.requires_grad_(False)
        self.taps = taps
        self.heads = nn.ModuleList([Head(dim) for _ in range(len(taps) + 1)])

    def prepare(self, x, crop=None):
        """[-1,1] -> ImageNet-normalised, then the 224 crop (given offsets) or the resize."""
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        x = x * (0.5 / std) + (0.5 - mean) / std
        s = self.image
        if crop is not None:
            top, left = crop
            return x[:, :, top:top + s, left:left + s]
        mode = "area" if x.shape[-1] > s else "bicubic"
        kw = {} if mode == "area" else {"align_corners": False}
        return F.interpolate(x, size=(s, s), mode=mode, **kw)

    def forward(self, x, crop=None):
        x = self.prepare(x, crop)
        vit = self.vit
        t = vit.patch_embed(x)
        t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + vit.pos_embed
        acts = [t]
        for i, blk in enumerate(vit.blocks):
            t = blk(t)
            if i in self.taps:
                acts.append(t)
        outs = []
        for a, head in zip(acts, self.heads):
            feat = (a[:, 1:] + a[:, :1]).transpose(1, 2)
            outs.append(head(feat).flatten(1))
        return torch.cat(outs, dim=1)
