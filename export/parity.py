"""Parity report: does the exported graph compute what PyTorch computes?

On a real batch from the data the artifact records (its test split, an image folder's val files, at the artifact's
input size; a seeded random batch in [0, 1] when the data cannot be read here, the report's ``data`` saying which),
compare the exported graph's logits with the PyTorch DeployableModel's (fp32, CPU): max abs diff and
top-1 agreement, at the profile's smallest batch and at the parity batch. Gates: fp32 max abs diff <= 1e-4 and
100 % top-1 agreement; fp16 <= 1e-2 and >= 99 %.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from fmkt.errors import FmktError

GATES = {"fp32": {"max_abs_diff": 1e-4, "top1_agreement": 1.0},
         "fp16": {"max_abs_diff": 1e-2, "top1_agreement": 0.99}}


class ParityError(FmktError):
    """The exported graph breached the parity gate (the CLI exits 1)."""


def parity_images(meta: dict, count: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(count, C, H, W) raw images in [0, 1] and a sentence naming them: the first ``count`` images of the test split
    of the data the artifact records (fmkt.json's ``dataset``: its name and, for an image folder, its folder), as
    evaluation sees them at the artifact's input size (:func:`fmkt.data.recorded_splits`, the split's
    ``sample_inputs``); a seeded random batch when that data cannot be read here or does not fit the artifact's
    input."""
    spec = meta["model"]["input"]
    shape = (spec["channels"], *spec["size"])
    recorded = meta.get("dataset") or {}
    name = recorded.get("name")
    if name:
        try:
            from fmkt.data import dataset_info, recorded_splits

            _, test, _ = recorded_splits(name, None, shape[1:], recorded)
            images = test.sample_inputs(count)
            if tuple(images.shape[1:]) == shape and len(images) > 0:
                return images, _described(name, recorded.get("dir"), len(images), shape,
                                          dataset_info(name, recorded.get("dir")).image_size)
        except FmktError:
            pass
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((count, *shape), generator=gen), f"seeded random batch (seed {seed}, uniform [0, 1])"


def _described(name: str, folder: str | None, n: int, shape: tuple, native) -> str:
    """The parity inputs' source: the dataset, its folder when the artifact records one, and the size it was read at
    when that is not the dataset's own (``data.image_size``)."""
    where = f" of {folder}" if folder else ""
    resized = "" if tuple(native) == tuple(shape[1:]) else f", resized to {shape[1]}x{shape[2]} as data.image_size does"
    return f"{name} test split{where}, first {n} images{resized}"


@dataclass
class ParityRow:
    batch: int
    max_abs_diff: float
    top1_agreement: float  # fraction in [0, 1]
    passed: bool


@dataclass
class ParityReport:
    target: str  # what ran the exported graph, e.g. "onnxruntime CPUExecutionProvider"
    precision: str
    data: str
    gate: dict
    rows: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def breach(self) -> str:
        """One sentence saying by how much the worst row missed the gate ('' when it passed)."""
        bad = [r for r in self.rows if not r.passed]
        if not bad:
            return ""
        r = max(bad, key=lambda r: r.max_abs_diff / self.gate["max_abs_diff"])
        parts = []
        if r.max_abs_diff > self.gate["max_abs_diff"]:
            parts.append(f"max abs diff {r.max_abs_diff:.3g} exceeds the {self.gate['max_abs_diff']:g} gate by "
                         f"{r.max_abs_diff - self.gate['max_abs_diff']:.3g}")
        if r.top1_agreement < self.gate["top1_agreement"]:
            parts.append(f"top-1 agreement {100 * r.top1_agreement:.2f} % is "
                         f"{100 * (self.gate['top1_agreement'] - r.top1_agreement):.2f} points under the "
                         f"{100 * self.gate['top1_agreement']:g} % gate")
        return f"{self.target} ({self.precision}) fails parity at batch {r.batch}: {' and '.join(parts)}"

    def to_dict(self) -> dict:
        return {"target": self.target, "precision": self.precision, "data": self.data, "gate": self.gate,
                "passed": self.passed, "rows": [asdict(r) for r in self.rows]}

    def table(self, title: str = "parity: PyTorch vs exported graph"):
        from rich.table import Table

        table = Table(title=f"{title} ({self.target}, {self.precision})", caption=self.data)
        for name in ("batch", "max abs diff", "top-1 agreement (%)", "gate", "result"):
            table.add_column(name, justify="right" if name != "result" else "left")
        gate = f"<= {self.gate['max_abs_diff']:g}, >= {100 * self.gate['top1_agreement']:g} %"
        for r in self.rows:
            table.add_row(str(r.batch), f"{r.max_abs_diff:.3e}", f"{100 * r.top1_agreement:.2f}", gate,
                          "[green]pass[/]" if r.passed else "[bold red]FAIL[/]")
        return table


def compare(reference: torch.Tensor, exported: torch.Tensor, gate: dict) -> ParityRow:
    """Logits (B, classes) from PyTorch and from the exported graph -> one report row."""
    reference, exported = reference.detach().float().cpu(), exported.detach().float().cpu()
    if reference.shape != exported.shape:
        raise RuntimeError(f"the exported graph returned shape {tuple(exported.shape)}, PyTorch "
                           f"{tuple(reference.shape)}")
    diff = (reference - exported).abs().max().item() if reference.numel() else 0.0
    if diff != diff:  # NaN
        diff = float("inf")
    agree = (reference.argmax(1) == exported.argmax(1)).float().mean().item()
    return ParityRow(int(reference.shape[0]), diff, agree,
                     diff <= gate["max_abs_diff"] and agree >= gate["top1_agreement"])


def check_parity(reference_fn: Callable, exported_fn: Callable, images: torch.Tensor, batches: list[int],
                 precision: str, target: str, data: str) -> ParityReport:
    """Run both on images[:b] for each b in ``batches`` and gather the rows."""
    gate = GATES[precision]
    report = ParityReport(target=target, precision=precision, data=data, gate=gate)
    for b in sorted(set(min(b, len(images)) for b in batches)):
        x = images[:b]
        with torch.no_grad():
            report.rows.append(compare(reference_fn(x), exported_fn(x), gate))
    return report
