"""Detection parity: does the exported detector find what the PyTorch detector finds? (issue 23)

Each parity image runs through both (fp32, CPU, one image per call: the graph's batch is 1). Per image, every
reference detection is paired with the exported detection of the same label that overlaps it most (IoU >= 0.5;
greedy in the reference's score order, each exported detection used once). Over all images:

- ``match_rate``: pairs / max(reference, exported detections), summed over images (1.0 when neither found any):
  a detection missing, extra, or of another label counts against it;
- ``max_box_diff_px``: the largest |coordinate difference| of a pair, in input pixels;
- ``max_score_diff``: the largest |score difference| of a pair.

Gates (fp32, the only precision detection exports): boxes <= 0.01 px, scores <= 1e-4, match rate >= 0.99. Measured
eager vs ONNX Runtime on the test detector (64-pixel images): boxes 2.7e-5 px, scores 2.7e-7, every detection
paired, so both numeric gates sit ~400x above fp32 noise and ~100x under a pixel; the 1 % slack of the match rate
is for a detection at a decision boundary (the score threshold, an NMS IoU, the per-image cap) that a 1e-6
difference may legitimately flip; a real change (a moved box, a swapped label, a lost detection) breaches a gate.

Parity images, best first: the artifact's recorded COCO-format dataset (``dataset.root`` + ``dataset.split``,
default ``val``: its first images, resized as evaluation does), else the Fashion-MNIST canvases (the val canvases
``make_detection_data`` draws with seed 0, drawn in memory at the graph's input size), else a seeded random batch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from fmkt.errors import FmktError

GATES = {"fp32": {"max_box_diff_px": 1e-2, "max_score_diff": 1e-4, "match_rate": 0.99}}
MIN_IOU = 0.5
COUNT = 8  # parity images


@dataclass
class DetectionRow:
    image: int
    reference: int  # detections PyTorch found
    exported: int  # detections the exported graph found
    matched: int
    max_box_diff_px: float
    max_score_diff: float


@dataclass
class DetectionParityReport:
    """The same top-level keys as :class:`fmkt.export.parity.ParityReport`; rows per image, gated on the totals."""
    target: str
    precision: str
    data: str
    gate: dict
    rows: list = field(default_factory=list)

    def totals(self) -> dict:
        ref, exp = sum(r.reference for r in self.rows), sum(r.exported for r in self.rows)
        pairs, union = sum(r.matched for r in self.rows), sum(max(r.reference, r.exported) for r in self.rows)
        return {"images": len(self.rows), "reference": ref, "exported": exp, "matched": pairs,
                "match_rate": pairs / union if union else 1.0,
                "max_box_diff_px": max((r.max_box_diff_px for r in self.rows), default=0.0),
                "max_score_diff": max((r.max_score_diff for r in self.rows), default=0.0)}

    def misses(self) -> list[str]:
        t, g = self.totals(), self.gate
        out = []
        if t["max_box_diff_px"] > g["max_box_diff_px"]:
            out.append(f"max box diff {t['max_box_diff_px']:.3g} px exceeds the {g['max_box_diff_px']:g} px gate")
        if t["max_score_diff"] > g["max_score_diff"]:
            out.append(f"max score diff {t['max_score_diff']:.3g} exceeds the {g['max_score_diff']:g} gate")
        if t["match_rate"] < g["match_rate"]:
            out.append(f"{t['matched']} of {max(t['reference'], t['exported'])} detections match (same label, IoU "
                       f">= {MIN_IOU}): {100 * t['match_rate']:.2f} % is under the {100 * g['match_rate']:g} % gate")
        return out

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.misses()

    def breach(self) -> str:
        """One sentence saying which gate the totals missed and by how much ('' when it passed)."""
        misses = self.misses() if self.rows else ["no parity image was run"]
        if not misses:
            return ""
        return f"{self.target} ({self.precision}) fails detection parity on {len(self.rows)} images: " \
               f"{' and '.join(misses)}"

    def to_dict(self) -> dict:
        return {"target": self.target, "precision": self.precision, "data": self.data, "gate": self.gate,
                "passed": self.passed, "totals": self.totals(), "rows": [asdict(r) for r in self.rows]}

    def table(self, title: str = "detection parity: PyTorch vs exported graph"):
        from rich.table import Table

        table = Table(title=f"{title} ({self.target}, {self.precision})", caption=self.data)
        for name in ("image", "detections (PyTorch / graph)", "matched", "max box diff (px)", "max score diff"):
            table.add_column(name, justify="right")
        for r in self.rows:
            table.add_row(str(r.image), f"{r.reference} / {r.exported}", str(r.matched), f"{r.max_box_diff_px:.2e}",
                          f"{r.max_score_diff:.2e}")
        t, g = self.totals(), self.gate
        verdict = "[green]pass[/]" if self.passed else "[bold red]FAIL[/]"
        table.add_row("all", f"{t['reference']} / {t['exported']}", f"{100 * t['match_rate']:.2f} % (>= "
                      f"{100 * g['match_rate']:g} %)", f"{t['max_box_diff_px']:.2e} (<= {g['max_box_diff_px']:g})",
                      f"{t['max_score_diff']:.2e} (<= {g['max_score_diff']:g}) {verdict}")
        return table


def match(reference: tuple, exported: tuple, index: int = 0) -> DetectionRow:
    """One image's row: (boxes (n, 4), scores (n,), labels (n,)) of PyTorch and of the exported graph."""
    from torchvision.ops import box_iou

    (rb, rs, rl), (eb, es, el) = ([torch.as_tensor(t).detach().cpu() for t in side] for side in (reference, exported))
    rb, eb, rs, es = rb.double(), eb.double(), rs.double(), es.double()
    iou = box_iou(rb, eb) if len(rb) and len(eb) else torch.zeros((len(rb), len(eb)), dtype=torch.float64)
    iou[rl[:, None] != el[None, :]] = -1.0  # another label never pairs
    used, box, score, pairs = set(), 0.0, 0.0, 0
    for i in range(len(rb)):
        free = [j for j in range(len(eb)) if j not in used and iou[i, j] >= MIN_IOU]
        if not free:
            continue
        j = max(free, key=lambda j: float(iou[i, j]))
        used.add(j)
        pairs += 1
        box, score = max(box, float((rb[i] - eb[j]).abs().max())), max(score, float((rs[i] - es[j]).abs()))
    return DetectionRow(index, len(rb), len(eb), pairs, _finite(box), _finite(score))


def _finite(x: float) -> float:
    return float("inf") if x != x else x


def check_detection_parity(reference_fn: Callable, exported_fn: Callable, images: torch.Tensor, precision: str,
                           target: str, data: str) -> DetectionParityReport:
    """Run both on each image (batch 1) and gather the rows; ``*_fn(x (1, 3, H, W)) -> (boxes, scores, labels)``."""
    if precision not in GATES:
        raise FmktError(f"detection exports are {', '.join(GATES)} only, not {precision}.")
    report = DetectionParityReport(target=target, precision=precision, data=data, gate=GATES[precision])
    for i in range(len(images)):
        x = images[i:i + 1]
        with torch.no_grad():
            report.rows.append(match(reference_fn(x), exported_fn(x), i))
    return report


# --------------------------------------------------------------------------------------------------- the images
def parity_images(meta: dict, side: int, count: int = COUNT, seed: int = 0) -> tuple[torch.Tensor, str]:
    """((n, 3, side, side) raw images in [0, 1], where they came from): see the module docstring."""
    dataset = meta.get("dataset") or {}
    root = dataset.get("root") if isinstance(dataset, dict) else None
    if root:
        try:
            return _coco_images(root, dataset.get("split") or "val", side, count)
        except FmktError:
            pass
    try:
        return _canvas_images(side, count, seed)
    except (FmktError, OSError, KeyError):
        pass
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((count, 3, side, side), generator=gen),
            f"seeded random batch (seed {seed}, uniform [0, 1], {side}x{side}): neither the artifact's dataset nor "
            "the Fashion-MNIST canvases could be read")


def _coco_images(root, split: str, side: int, count: int) -> tuple[torch.Tensor, str]:
    from fmkt.data.transforms import decode_rgb
    from fmkt.detection.coco import open_coco
    from fmkt.detection.transforms import eval_transform

    coco = open_coco(root, split)
    n = min(count, len(coco))
    if n == 0:
        raise FmktError(f"{root} {split} has no image")
    images = [eval_transform(decode_rgb(coco.path(i)), torch.zeros((0, 4)), side)[0] for i in range(n)]
    return (torch.stack(images).float() / 255.0,
            f"{root} {split} split, first {n} images, resized to {side}x{side} as evaluation does")


def _canvas_images(side: int, count: int, seed: int) -> tuple[torch.Tensor, str]:
    import numpy as np

    from fmkt.detection.canvas import SPLITS, _read_items, draw_canvas

    pool = _read_items("fashion-mnist", None)[0]["val"]
    code = dict(SPLITS)["val"]
    pixels = [draw_canvas(np.random.default_rng([seed, code, i]), pool, side)[0] for i in range(count)]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0
    return (images.contiguous(), f"Fashion-MNIST canvases (the val canvases of make_detection_data, seed {seed}, "
            f"{side}x{side}, first {count}): the artifact records no readable COCO-format dataset")
