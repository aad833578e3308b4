"""Process-wide numeric settings shared by every stage (training, evaluation, export, bench)."""
from __future__ import annotations

from contextlib import contextmanager

import torch

# What fmkt.json and export.json record for numbers measured under strict_fp32().
FP32 = "fp32 (IEEE; TF32 off)"


@contextmanager
def strict_fp32():
    """IEEE fp32 matmuls and convolutions for the block: TF32 off in cuBLAS and cuDNN (on by default for cuDNN
    convolutions on Ampere/Hopper, where it costs ~1e-3 of relative accuracy), restored afterwards. No effect on
    CPU math, nor on autocast regions (those run in 16 bits anyway)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
