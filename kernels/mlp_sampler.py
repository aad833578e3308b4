"""All K sampler steps of the per-pixel ``mlp`` meta-encoder in one launch (inference only).

Every op of ``MLPEncoder`` is per pixel, so a program can hold a tile of pixels' states (BLOCK_P pixels x C
channels of one image) in registers and run the whole flow on it: per step, the time embedding, ``depth``
residual blocks h + W2 relu(W1 LN(h) + b1) + b2 and the output conv (tl.dot, the hidden width in chunks of
BLOCK_H), the Euler update and the pooled teacher estimate. z1 is read once; only the pooled results are
written: per program, partial channel sums of the step-mean estimate and of the final state, which the host
adds up (deterministic, no atomics).

Matmul operands are in z1's dtype (fp16/bf16 like autocast, fp32 as IEEE or TF32 following
``torch.backends.cudnn.allow_tf32`` as eager conv1x1 does); the state, LayerNorm and sums stay in fp32.
Not differentiable: training goes through ``FusedEulerStep``. The reference twin is ``mlp_sampler_reference``:
the torch loop of ``run_sampler``. Importing this module imports Triton.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import nn

from fmkt.flow.encoders import ChannelLayerNorm, MLPEncoder
from fmkt.flow.sampler import fp32, run_sampler, time_embeddings
from fmkt.flow.schedules import StepConstants
from fmkt.kernels import on_device
from fmkt.kernels.euler_step import INTERPRETED, _empty

MAX_CHANNELS = 512  # the state tile holds all channels of BLOCK_P pixels; beyond this it would spill
NUM_STAGES = None  # software-pipelining depth of the launch (None: Triton's default)

__all__ = ["mlp_sampler_forward", "mlp_sampler_reference", "mlp_sampler_supported", "MAX_CHANNELS"]


@triton.jit
def _mlp_sampler_kernel(
    z_ptr, emb_ptr, coef_ptr,
    ln_w_ptr, ln_b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, wo_ptr, bo_ptr,
    est_ptr, fin_ptr,
    B, C, HW, HID, K, DEPTH,
    p_sum, est_scale, fin_scale, eps,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    pix = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    pm = pix < HW
    cm = ch < C
    m = pm[:, None] & cm[None, :]
    dot_ty = w1_ptr.dtype.element_ty
    z = tl.load(z_ptr + b.to(tl.int64) * C * HW + ch[None, :] * HW + pix[:, None], mask=m, other=0.0).to(tl.float32)
    x = z
    # estimate_i = p_i z1 + q_i v_i, so sum_i pool(estimate_i) = sum_i p_i pool(z1) + sum_i q_i pool(v_i).
    est = p_sum * tl.sum(z, axis=0)
    for i in range(K):
        dt = tl.load(coef_ptr + 3 * i)
        q = tl.load(coef_ptr + 3 * i + 2)
        e = tl.load(emb_ptr + i * C + ch, mask=cm, other=0.0).to(tl.float32)
        h = x + e[None, :]  # padded channels stay exactly 0 through every op below
        for d in range(DEPTH):
            mean = tl.sum(h, axis=1) / C
            diff = tl.where(cm[None, :], h - mean[:, None], 0.0)
            var = tl.sum(diff * diff, axis=1) / C
            lw = tl.load(ln_w_ptr + d * C + ch, mask=cm, other=0.0).to(tl.float32)
            lb = tl.load(ln_b_ptr + d * C + ch, mask=cm, other=0.0).to(tl.float32)
            hn = (diff * tl.rsqrt(var + eps)[:, None] * lw[None, :] + lb[None, :]).to(dot_ty)
            acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
            for j in range(0, HID, BLOCK_H):
                hc = j + tl.arange(0, BLOCK_H)
                hm = hc < HID
                w1 = tl.load(w1_ptr + d * C * HID + ch[:, None] * HID + hc[None, :],
                             mask=cm[:, None] & hm[None, :], other=0.0)
                b1 = tl.load(b1_ptr + d * HID + hc, mask=hm, other=0.0).to(tl.float32)
                a = tl.dot(hn, w1, input_precision=PRECISION) + b1[None, :]
                a = tl.maximum(a, 0.0).to(dot_ty)
                w2 = tl.load(w2_ptr + d * HID * C + hc[:, None] * C + ch[None, :],
                             mask=hm[:, None] & cm[None, :], other=0.0)
                acc = tl.dot(a, w2, acc, input_precision=PRECISION)
            b2 = tl.load(b2_ptr + d * C + ch, mask=cm, other=0.0).to(tl.float32)
            h = h + acc + b2[None, :]
        # Output conv v = h Wo + bo. A [C, C] operand may not fit shared memory, so take Wo in row chunks; the
        # matching columns of h are picked out with a 0/1 selection matrix (exact: one nonzero per column).
        hd = h.to(dot_ty)
        v = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for j in range(0, C, BLOCK_H):
            hc = j + tl.arange(0, BLOCK_H)
            hm = hc < C
            sel = tl.where(ch[:, None] == hc[None, :], 1.0, 0.0).to(dot_ty)
            h_j = tl.dot(hd, sel, input_precision=PRECISION).to(dot_ty)
            wo = tl.load(wo_ptr + hc[:, None] * C + ch[None, :], mask=hm[:, None] & cm[None, :], other=0.0)
            v = tl.dot(h_j, wo, v, input_precision=PRECISION)
        bo = tl.load(bo_ptr + ch, mask=cm, other=0.0).to(tl.float32)
        v = v + bo[None, :]
        x = x - dt * v
        est += q * tl.sum(tl.where(pm[:, None], v, 0.0), axis=0)
    out = (tile * B + b) * C + ch
    tl.store(est_ptr + out, est * est_scale, mask=cm)
    tl.store(fin_ptr + out, tl.sum(tl.where(pm[:, None], x, 0.0), axis=0) * fin_scale, mask=cm)


def mlp_sampler_supported(encoder: nn.Module, channels: int | None = None) -> bool:
    """True when ``encoder`` is exactly the built-in MLPEncoder structure this kernel implements."""
    if type(encoder) is not MLPEncoder or len(encoder.blocks) == 0:
        return False
    out = encoder.out
    c = out.in_channels
    if (channels is not None and c != channels) or c > MAX_CHANNELS:
        return False
    convs = [out]
    eps = {blk[0].eps for blk in encoder.blocks if isinstance(blk[0], ChannelLayerNorm)}
    for blk in encoder.blocks:
        if (len(blk) != 4 or type(blk[0]) is not ChannelLayerNorm or type(blk[2]) is not nn.ReLU
                or blk[1].out_channels != blk[3].in_channels or blk[1].out_channels != encoder.blocks[0][1].out_channels):
            return False
        convs += [blk[1], blk[3]]
    for conv in convs:
        if (type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1
                or conv.padding not in ((0, 0), "valid") or conv.dilation != (1, 1) or conv.bias is None):
            return False
    return len(eps) == 1 and out.out_channels == c


def _packed_weights(encoder: MLPEncoder, dtype: torch.dtype, device: torch.device) -> tuple:
    """Stacked, transposed weights (cached on the encoder until a parameter changes)."""
    params = list(encoder.parameters())
    key = (dtype, device, tuple((p.data_ptr(), p._version) for p in params))
    cached = getattr(encoder, "_fmkt_mlp_sampler_pack", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        blocks = encoder.blocks
        c, hid = encoder.out.in_channels, blocks[0][1].out_channels
        f32 = dict(dtype=torch.float32, device=device)
        pack = (
            torch.stack([blk[0].weight for blk in blocks]).to(**f32).contiguous(),  # (D, C)
            torch.stack([blk[0].bias for blk in blocks]).to(**f32).contiguous(),  # (D, C)
            torch.stack([blk[1].weight.reshape(hid, c).t() for blk in blocks]).to(dtype).contiguous(),  # (D, C, HID)
            torch.stack([blk[1].bias for blk in blocks]).to(**f32).contiguous(),  # (D, HID)
            torch.stack([blk[3].weight.reshape(c, hid).t() for blk in blocks]).to(dtype).contiguous(),  # (D, HID, C)
            torch.stack([blk[3].bias for blk in blocks]).to(**f32).contiguous(),  # (D, C)
            encoder.out.weight.reshape(c, c).t().to(dtype).contiguous(),  # (C_in, C_out)
            encoder.out.bias.to(**f32).contiguous(),  # (C,)
        )
    encoder._fmkt_mlp_sampler_pack = (key, pack)
    return pack


def _tiles(c: int, hw: int, hid: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, BLOCK_H, num_warps); tl.dot needs every dimension >= 16.

    BLOCK_P is at most 32 (16 below 128 channels): on an H100 (Triton 3.6) a 64-pixel tile with 16-bit operands
    gave wrong sums and an illegal memory access (2 x 17 x 5 x 7, fp16/bf16), while 16- and 32-pixel tiles matched
    the torch loop in every case checked; see BENCHMARKS.md, kernels."""
    block_c = max(16, triton.next_power_of_2(c))
    block_h = max(16, min(64, triton.next_power_of_2(max(hid, c))))
    if INTERPRETED:
        return max(16, triton.next_power_of_2(hw)), block_c, max(16, triton.next_power_of_2(max(hid, c))), 4
    block_p = 16 if block_c >= 512 or block_c < 128 else 32
    block_p = max(16, min(block_p, triton.next_power_of_2(hw)))
    return block_p, block_c, block_h, 8 if block_c >= 256 else 4


def _stages(dtype: torch.dtype, block_c: int) -> int | None:
    """Pipelining depth: 1 for fp32 operands from 256 channels (the default asked 303 KB of shared memory for
    C = 256 on an H100, over its 227 KB), else Triton's default. ``NUM_STAGES`` overrides."""
    if NUM_STAGES:
        return NUM_STAGES
    return 1 if dtype == torch.float32 and block_c >= 256 else None


@torch.no_grad()
def mlp_sampler_forward(z1: torch.Tensor, encoder: MLPEncoder, time_embed: nn.Module,
                        steps: Sequence[StepConstants]) -> tuple[torch.Tensor, torch.Tensor]:
    """K-step sampler in one launch. z1: (B, C, H, W).

    Returns (mean over steps of the pooled estimates (B, C), pooled final state (B, C)), in fp32 like the twin:
    exactly what inference needs for logit transfer (S of the first) and feature transfer (S of the second).
    """
    b, c, h, w = z1.shape
    hw, k = h * w, len(steps)
    if not mlp_sampler_supported(encoder, c):
        raise ValueError("mlp_sampler_forward needs the built-in MLPEncoder with the map's channel count "
                         f"(<= {MAX_CHANNELS}).")
    z1 = z1.contiguous()
    dot_dtype = z1.dtype
    ln_w, ln_b, w1, b1, w2, b2, wo, bo = _packed_weights(encoder, dot_dtype, z1.device)
    depth, hid = w1.shape[0], w1.shape[2]
    emb = time_embeddings(time_embed, steps, fp32(z1[:0])).contiguous()  # (K, C) fp32, as the torch loop adds it
    coef = torch.tensor([[s.dt, s.p, s.q] for s in steps], dtype=torch.float32, device=z1.device)
    block_p, block_c, block_h, warps = _tiles(c, hw, hid)
    n_tiles = triton.cdiv(hw, block_p)
    est = _empty((n_tiles, b, c), torch.float32, z1.device)
    fin = _empty((n_tiles, b, c), torch.float32, z1.device)
    if dot_dtype == torch.float32:
        precision = "tf32" if (z1.is_cuda and torch.backends.cudnn.allow_tf32) else "ieee"
    else:
        precision = "ieee"  # fp16/bf16 operands: the choice does not apply
    with on_device(z1):
        _mlp_sampler_kernel[(b, n_tiles)](
            z1, emb, coef, ln_w, ln_b, w1, b1, w2, b2, wo, bo, est, fin,
            b, c, hw, hid, k, depth,
            sum(s.p for s in steps), 1.0 / (k * hw), 1.0 / hw, float(encoder.blocks[0][0].eps),
            BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_H=block_h, PRECISION=precision, num_warps=warps,
            **({"num_stages": stages} if (stages := _stages(dot_dtype, block_c)) else {}),
        )
    return est.sum(0), fin.sum(0)


@torch.no_grad()
def mlp_sampler_reference(z1, encoder, time_embed, steps) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-torch twin: the eager K-step loop of ``run_sampler``; same returns as mlp_sampler_forward."""
    out = run_sampler(z1, encoder, time_embed, steps)
    return out.mean_pooled(), out.final_state.mean(dim=(2, 3))
