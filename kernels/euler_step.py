"""The fused elementwise part of one sampler step (forward and backward), for every encoder and schedule.

With per-step scalars dt, p, q and the next step's time embedding e (B or 1, C):
    x_next = x - dt * v
    u_next = x_next + e[:, :, None, None]              (the next encoder input; skipped on the last step)
    pooled[b, c] = mean_{H,W}(p * z1 + q * v)          (what the shape map S needs)
The forward kernel reads x, v, z1 once and writes x_next, u_next and pooled once; the backward kernel reads
the output gradients once and writes the gradients of x, v, z1 (and the per-plane sums for e) once. Math is
fp32 in registers whatever the storage dtype; the pooled mean is accumulated in fp32.

The pure-torch reference twin is ``euler_step_reference`` (fmkt.flow.sampler), re-exported here.
Importing this module imports Triton; ``fmkt.kernels`` imports it only when a kernel is asked for.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fmkt.flow.sampler import euler_step_reference
from fmkt.kernels import on_device

# Triton decides interpreter-or-compiler when a kernel is decorated, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

__all__ = ["FusedEulerStep", "euler_step_forward", "euler_step_backward", "euler_step_reference", "INTERPRETED"]


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (the tests poison it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _euler_step_fwd_kernel(
    x_ptr, v_ptr, z_ptr, e_ptr, xn_ptr, un_ptr, pooled_ptr,
    n_planes, C, HW, e_stride_b,
    dt, p, q, inv_hw,
    HAS_E: tl.constexpr, ROWS: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # One program owns ROWS whole (b, c) planes, so the pooled mean needs no cross-program reduction.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_planes
    base = rows.to(tl.int64) * HW
    if HAS_E:
        e = tl.load(e_ptr + (rows // C) * e_stride_b + rows % C, mask=row_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        cols = start + tl.arange(0, BLOCK_HW)
        mask = row_mask[:, None] & (cols[None, :] < HW)
        offs = base[:, None] + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xn = x - dt * v
        tl.store(xn_ptr + offs, xn.to(xn_ptr.dtype.element_ty), mask=mask)
        if HAS_E:
            tl.store(un_ptr + offs, (xn + e[:, None]).to(un_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(p * z + q * v, axis=1)  # masked lanes loaded 0, so they add 0
    tl.store(pooled_ptr + rows, (acc * inv_hw).to(pooled_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _euler_step_bwd_kernel(
    gxn_ptr, gun_ptr, gp_ptr, dx_ptr, dv_ptr, dz_ptr, de_ptr,
    n_planes, HW,
    dt, p, q, inv_hw,
    HAS_GX: tl.constexpr, HAS_GU: tl.constexpr, HAS_GP: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DV: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # dL/dx = gx + gu;  dL/dv = -dt (gx + gu) + q gp / HW;  dL/dz1 = p gp / HW;  dL/de[b, c] = sum_HW gu.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_planes
    base = rows.to(tl.int64) * HW
    if HAS_GP:
        gp = tl.load(gp_ptr + rows, mask=row_mask, other=0.0).to(tl.float32) * inv_hw
    else:
        gp = tl.zeros([ROWS], dtype=tl.float32)
    de = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        cols = start + tl.arange(0, BLOCK_HW)
        mask = row_mask[:, None] & (cols[None, :] < HW)
        offs = base[:, None] + cols[None, :]
        g = tl.zeros([ROWS, BLOCK_HW], dtype=tl.float32)
        if HAS_GX:
            g += tl.load(gxn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GU:
            gu = tl.load(gun_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g += gu
            de += tl.sum(gu, axis=1)
        if NEED_DX:
            tl.store(dx_ptr + offs, g.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DV:
            tl.store(dv_ptr + offs, (q * gp[:, None] - dt * g).to(dv_ptr.dtype.element_ty), mask=mask)
        if NEED_DZ:
            dz = tl.zeros([ROWS, BLOCK_HW], dtype=tl.float32) + p * gp[:, None]
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_DE:
        tl.store(de_ptr + rows, de, mask=row_mask)


def _tiles(n_planes: int, hw: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_HW, num_warps): ~4K elements a program on a GPU; big tiles (few programs) interpreted."""
    max_tile = 1 << 16 if INTERPRETED else 4096
    block_hw = min(triton.next_power_of_2(hw), 1024 if not INTERPRETED else max_tile)
    rows = max(1, min(triton.next_power_of_2(n_planes), max_tile // block_hw))
    return rows, block_hw, 8 if rows * block_hw >= 4096 else 4


def _check(x, v, z1, e_next):
    if x.dim() != 4 or x.shape != v.shape or x.shape != z1.shape:
        raise ValueError(f"x, v, z1 must share one (B, C, H, W) shape, got {tuple(x.shape)}, {tuple(v.shape)}, "
                         f"{tuple(z1.shape)}")
    if e_next is not None and (e_next.dim() != 2 or e_next.shape[1] != x.shape[1]
                               or e_next.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"e_next must be (B or 1, C) = (*, {x.shape[1]}), got {tuple(e_next.shape)}")


def euler_step_forward(x, v, z1, e_next, dt: float, p: float, q: float):
    """Fused forward. x, v, z1: (B, C, H, W); e_next: (B or 1, C) or None.

    Returns x_next (B, C, H, W) in x and v's promoted dtype, u_next (B, C, H, W) in z1's dtype (or None) and
    pooled (B, C) in fp32, like the twin ``euler_step_reference``.
    """
    _check(x, v, z1, e_next)
    b, c, h, w = x.shape
    hw, n_planes = h * w, b * c
    dtype = torch.result_type(x, v)
    x, v, z1 = x.contiguous(), v.contiguous(), z1.contiguous()
    x_next = _empty(x.shape, dtype, x.device)
    u_next = None if e_next is None else _empty(x.shape, z1.dtype, x.device)  # the encoder's input dtype
    pooled = _empty((b, c), torch.float32, x.device)  # the estimate is fp32 whatever the operands (as the twin)
    if e_next is not None:
        e_next = e_next.contiguous()
    rows, block_hw, warps = _tiles(n_planes, hw)
    with on_device(x):
        _euler_step_fwd_kernel[(triton.cdiv(n_planes, rows),)](
            x, v, z1, e_next if e_next is not None else x, x_next, u_next if u_next is not None else x_next, pooled,
            n_planes, c, hw, 0 if e_next is None or e_next.shape[0] == 1 else c,
            float(dt), float(p), float(q), 1.0 / hw,
            HAS_E=e_next is not None, ROWS=rows, BLOCK_HW=block_hw, num_warps=warps,
        )
    return x_next, u_next, pooled


def euler_step_backward(g_x_next, g_u_next, g_pooled, shape, dt: float, p: float, q: float, *,
                        dtypes, e_batch: int | None, needs=(True, True, True, True)):
    """Fused backward: gradients (dx, dv, dz1, de) from the output gradients (any of them None = zero).

    shape: (B, C, H, W); dtypes: dtypes of (x, v, z1, e); e_batch: 1 or B (None when there was no e).
    A gradient that is not needed, or is identically zero, comes back as None.
    """
    b, c, h, w = shape
    hw, n_planes = h * w, b * c
    ref = next(g for g in (g_x_next, g_u_next, g_pooled) if g is not None)
    device = ref.device
    has_gx, has_gu, has_gp = g_x_next is not None, g_u_next is not None, g_pooled is not None
    need_dx = needs[0] and (has_gx or has_gu)
    need_dv = needs[1] and (has_gx or has_gu or has_gp)
    need_dz = needs[2] and has_gp
    need_de = needs[3] and has_gu and e_batch is not None
    if not (need_dx or need_dv or need_dz or need_de):
        return None, None, None, None
    g_x_next = g_x_next.contiguous() if has_gx else None
    g_u_next = g_u_next.contiguous() if has_gu else None
    g_pooled = g_pooled.contiguous() if has_gp else None
    dx = _empty(shape, dtypes[0], device) if need_dx else None
    dv = _empty(shape, dtypes[1], device) if need_dv else None
    dz = _empty(shape, dtypes[2], device) if need_dz else None
    de_planes = _empty((b, c), torch.float32, device) if need_de else None
    dummy = ref
    rows, block_hw, warps = _tiles(n_planes, hw)
    with on_device(ref):
        _euler_step_bwd_kernel[(triton.cdiv(n_planes, rows),)](
            g_x_next if has_gx else dummy, g_u_next if has_gu else dummy, g_pooled if has_gp else dummy,
            dx if need_dx else dummy, dv if need_dv else dummy, dz if need_dz else dummy,
            de_planes if need_de else dummy,
            n_planes, hw, float(dt), float(p), float(q), 1.0 / hw,
            HAS_GX=has_gx, HAS_GU=has_gu, HAS_GP=has_gp,
            NEED_DX=need_dx, NEED_DV=need_dv, NEED_DZ=need_dz, NEED_DE=need_de,
            ROWS=rows, BLOCK_HW=block_hw, num_warps=warps,
        )
    de = None
    if need_de:
        de = (de_planes.sum(0, keepdim=True) if e_batch == 1 else de_planes).to(dtypes[3])
    return dx, dv, dz, de


class FusedEulerStep(torch.autograd.Function):
    """Autograd wrapper: ``FusedEulerStep.apply(x, v, z1, e_next, dt, p, q) -> (x_next, u_next | None, pooled)``.

    The backward needs none of the inputs (the step is affine in them), so nothing is saved but shapes.
    """

    @staticmethod
    def forward(ctx, x, v, z1, e_next, dt, p, q):
        ctx.set_materialize_grads(False)  # unused outputs (the last x_next, the last u_next) cost nothing
        ctx.shape, ctx.dt, ctx.p, ctx.q = tuple(x.shape), dt, p, q
        ctx.dtypes = (x.dtype, v.dtype, z1.dtype, None if e_next is None else e_next.dtype)
        ctx.e_batch = None if e_next is None else e_next.shape[0]
        return euler_step_forward(x, v, z1, e_next, dt, p, q)

    @staticmethod
    def backward(ctx, g_x_next, g_u_next, g_pooled):
        if g_x_next is None and g_u_next is None and g_pooled is None:
            return None, None, None, None, None, None, None
        dx, dv, dz, de = euler_step_backward(
            g_x_next, g_u_next, g_pooled, ctx.shape, ctx.dt, ctx.p, ctx.q,
            dtypes=ctx.dtypes, e_batch=ctx.e_batch, needs=ctx.needs_input_grad[:4],
        )
        return dx, dv, dz, de, None, None, None
