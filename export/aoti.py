"""AOTInductor: ``torch.export`` the static module (dynamic batch) and compile it into a ``.pt2`` package,
loadable with ``torch._inductor.aoti_load_package``. Compiled for the chosen device (CPU or CUDA).
FP16 casts the module to half inside and keeps float32 input and output."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn


class HalfPrecision(nn.Module):
    """float32 images -> module in float16 -> float32 logits."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = copy.deepcopy(module).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()


def export_aoti(module: nn.Module, example: torch.Tensor, package_path: Path, batch: tuple, precision: str,
                device: torch.device) -> dict:
    """Compile ``module`` for batches batch[0]..batch[2] of example's (C, H, W); write ``package_path``."""
    module = (HalfPrecision(module) if precision == "fp16" else module).to(device).eval()
    example = example.to(device)
    dim = torch.export.Dim("batch", min=max(1, batch[0]), max=max(batch[2], 2))
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: dim},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(package_path))
    return {"torch": torch.__version__, "device": str(device)}


def load_aoti(package_path: Path, device: torch.device):
    runner = torch._inductor.aoti_load_package(str(package_path))

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return runner(images.to(device).float()).float().cpu()

    return run
