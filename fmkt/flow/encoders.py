"""Meta-encoders v_theta(x + e(t)) and the sinusoidal time embedding.

Every encoder maps (B, C, H, W) -> (B, C, H, W); any ``nn.Module`` with that contract plugs in.
The time enters additively: e = g(sinusoidal(t, C)) with g = Linear-ReLU-Linear, reshaped to (1, C, 1, 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fmkt.errors import FmktError


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(T,) times in (0, 1] -> (T, dim) sinusoidal features (transformer positional style)."""
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)
    # Raw t in (0, 1] would barely turn the low frequencies; scale like a diffusion step index.
    args = (t.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """t -> g(sinusoidal(t)) of shape (T, C); g = Linear(C, C) - ReLU - Linear(C, C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(t, self.channels)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # a .half() or .double() model works too


class ConvEncoder(nn.Module):
    """The authors' default: SiLU, Conv3x3, GroupNorm(1), SiLU, Conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(1, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return self.net(x)


class DWConvEncoder(nn.Module):
    """The light one: ``conv`` with each dense Conv3x3 split into its depthwise and pointwise halves, and only one
    of each kept: SiLU, depthwise Conv3x3 (groups=C), GroupNorm(1), SiLU, Conv1x1.

    Per step on a C x H x W map: (9 + C) * C * H * W MACs against conv's 18 * C^2 * H * W, i.e. ~17x fewer at
    C = 256 (resnet8x4's 256 x 8 x 8: 4.3 M vs 75.5 M MACs, 69 k vs 1.18 M parameters). The 3x3 mixes space per
    channel, the 1x1 mixes channels per pixel. In ONNX the depthwise conv is a Conv with ``group`` = C (TensorRT
    builds it as such).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
            nn.GroupNorm(1, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x):
        return self.net(x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map, per pixel."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class MLPEncoder(nn.Module):
    """Per-pixel MLP: residual blocks x + Conv1x1(ReLU(Conv1x1(LN(x)))), then a final Conv1x1.

    Every op is per pixel, which is what lets a kernel run all K steps of a pixel tile in one launch.
    """

    def __init__(self, channels: int, depth: int = 2, expansion: int = 2):
        super().__init__()
        hidden = channels * expansion
        self.blocks = nn.ModuleList(
            nn.Sequential(
                ChannelLayerNorm(channels),
                nn.Conv2d(channels, hidden, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, channels, 1),
            )
            for _ in range(depth)
        )
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


class WindowAttentionEncoder(nn.Module):
    """One windowed multi-head self-attention block (4 heads x 64) with a 1x1-conv FFN.

    The map is cut into non-overlapping windows of ``window`` x ``window`` pixels (zero-padded; padded keys are
    masked out). Shapes other than batch are Python ints at trace time, so export sees a static graph.
    """

    def __init__(self, channels: int, heads: int = 4, head_dim: int = 64, window: int = 4, ffn_expansion: int = 2):
        super().__init__()
        self.heads, self.head_dim, self.window = heads, head_dim, window
        inner = heads * head_dim
        self.norm1 = ChannelLayerNorm(channels)
        self.qkv = nn.Conv2d(channels, 3 * inner, 1)
        self.proj = nn.Conv2d(inner, channels, 1)
        self.norm2 = ChannelLayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Conv2d(channels, channels * ffn_expansion, 1),
            nn.GELU(),
            nn.Conv2d(channels * ffn_expansion, channels, 1),
        )

    def _attention(self, x):
        b, _, h, w = x.shape
        h, w = int(h), int(w)  # Python ints even under the ONNX tracer: only the batch stays dynamic
        ws = min(self.window, max(h, w))
        ph, pw = (-h) % ws, (-w) % ws
        qkv = self.qkv(x)
        if ph or pw:
            qkv = F.pad(qkv, (0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        nh, nw = hp // ws, wp // ws
        # (B, 3, heads, d, nh, ws, nw, ws) -> (B * nh * nw, 3, heads, ws*ws, d)
        qkv = qkv.reshape(b, 3, self.heads, self.head_dim, nh, ws, nw, ws)
        qkv = qkv.permute(0, 4, 6, 1, 2, 5, 7, 3).reshape(b * nh * nw, 3, self.heads, ws * ws, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        attn = (q @ k.transpose(-2, -1)) * (self.head_dim ** -0.5)
        if ph or pw:
            valid = torch.zeros(hp, wp, dtype=torch.bool, device=x.device)
            valid[:h, :w] = True
            valid = valid.reshape(nh, ws, nw, ws).permute(0, 2, 1, 3).reshape(nh * nw, 1, 1, ws * ws)
            attn = attn.reshape(b, nh * nw, self.heads, ws * ws, ws * ws)
            attn = attn.masked_fill(~valid[None], float("-inf")).reshape(b * nh * nw, self.heads, ws * ws, ws * ws)
        out = attn.softmax(dim=-1) @ v  # (B*nh*nw, heads, ws*ws, d)
        out = out.reshape(b, nh, nw, self.heads, ws, ws, self.head_dim)
        out = out.permute(0, 3, 6, 1, 4, 2, 5).reshape(b, self.heads * self.head_dim, hp, wp)
        return self.proj(out[:, :, :h, :w])

    def forward(self, x):
        x = x + self._attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))


ENCODERS = {"conv": ConvEncoder, "dwconv": DWConvEncoder, "mlp": MLPEncoder, "transformer": WindowAttentionEncoder}


def build_encoder(name: str, channels: int, **kwargs) -> nn.Module:
    try:
        cls = ENCODERS[name]
    except KeyError:
        raise FmktError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}.") from None
    return cls(channels, **kwargs)
