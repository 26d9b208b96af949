"""PyTorch reference of CODA's multi-scale attention quantizer and LoRA, written from
shared/docs/coda-method.md §4-7 with the reference code's state-dict names
(`codebooks.weight`, `attn.to_q.weight`, `attn.norm_q.weight`, `...lora_layer.down.weight`).
Used only by scripts/make_fixtures.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, c, d_a, norm="rms_norm"):
        super().__init__()
        self.d_a = d_a
        self.to_q = nn.Linear(c, d_a)
        self.to_k = nn.Linear(c, d_a)
        self.to_v = nn.Linear(c, c)
        if norm == "rms_norm":
            self.norm_q, self.norm_k = RMSNorm(d_a), RMSNorm(d_a)
        elif norm == "layer_norm":
            self.norm_q, self.norm_k = nn.LayerNorm(d_a, eps=1e-5), nn.LayerNorm(d_a, eps=1e-5)
        else:
            self.norm_q = self.norm_k = nn.Identity()

    def forward(self, q, codebook):
        b, c, h, w = q.shape
        qs = self.norm_q(self.to_q(q.permute(0, 2, 3, 1).reshape(b, h * w, c)))
        k = self.norm_k(self.to_k(codebook))
        v = self.to_v(codebook)
        logits = torch.einsum("bnd,vd->bvn", qs, k).reshape(b, -1, h, w) / math.sqrt(self.d_a)
        p = logits.softmax(dim=1)
        idx = p.argmax(dim=1, keepdim=True)
        hard = torch.zeros_like(p).scatter_(1, idx, 1.0)
        st = hard - p.detach() + p
        z = torch.einsum("bnyx,nc->bcyx", st, v)
        z_hat = torch.einsum("bnyx,nc->bcyx", hard, v)
        return logits, idx, z, z_hat


def entropy_loss(logits, tau=0.01):
    v = logits.shape[1]
    flat = logits.permute(0, 2, 3, 1).reshape(-1, v)
    p = F.softmax(flat / tau, dim=-1)
    logp = F.log_softmax(flat / tau + 1e-5, dim=-1)
    h_sample = torch.mean(-(p * logp).sum(-1))
    p_avg = p.mean(0)
    h_avg = -(p_avg * torch.log(p_avg + 1e-5)).sum()
    return h_sample - h_avg


class CodaQuantizer(nn.Module):
    def __init__(self, vocab, c, d_a, beta=0.05, norm="rms_norm"):
        super().__init__()
        self.codebooks = nn.Embedding(vocab, c)
        self.attn = Attention(c, d_a, norm)
        self.beta = beta

    def forward(self, f, scales):
        """scales: list of (h, w). Returns ids per scale, f_hat, L_q, L_ent, logits per scale."""
        _, _, H, W = f.shape
        f_hat = torch.zeros_like(f)
        r = f
        ids, lq, lent, all_logits = [], [], [], []
        for (h, w) in scales:
            q = F.interpolate(r, size=(h, w), mode="area")
            logits, idx, z, z_hat = self.attn(q, self.codebooks.weight)
            lent.append(entropy_loss(logits))
            lq.append(torch.mean((z - q) ** 2) + torch.mean((z_hat.detach() - q) ** 2)
                      + self.beta * torch.mean((z_hat - q.detach()) ** 2))
            up = F.interpolate(z, size=(H, W), mode="bicubic", align_corners=False)
            f_hat = f_hat + up
            r = r - up
            ids.append(idx[:, 0])
            all_logits.append(logits)
        return ids, f_hat, sum(lq) / len(lq), sum(lent) / len(lent), all_logits


class LoRAConv2dLayer(nn.Module):
    def __init__(self, conv, rank):
        super().__init__()
        self.down = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, bias=False)
        self.up = nn.Conv2d(rank, conv.out_channels, 1, bias=False)
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.up(self.down(x))


class LoRACompatibleConv(nn.Conv2d):
    """A Conv2d with `lora_layer`: y = conv(x) + up(down(x)), scale 1."""

    def forward(self, x):
        return super().forward(x) + self.lora_layer(x)


def inject_lora(model, substrings, rank):
    """Replace every Conv2d whose qualified name contains a substring (encoder and decoder alike)."""
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and any(s in n for s in substrings)]
    for name in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        attr = name.rsplit(".", 1)[-1]
        old = getattr(parent, attr)
        new = LoRACompatibleConv(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                 bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        new.lora_layer = LoRAConv2dLayer(old, rank)
        setattr(parent, attr, new)
    return targets
