"""The CLI's tables of a detection run and of a detection artifact's evaluation: COCO mAP (AP, AP50, AP75, APs,
APm, APl in percent; "-" where COCO leaves one undefined)."""
from __future__ import annotations

from rich.table import Table

from fmkt.detection.coco_eval import KEYS
from fmkt.evaluation import step_label


def _cells(values: dict) -> list[str]:
    return ["-" if values.get(k) is None else f"{values[k]:.2f}" for k in KEYS]


def _table(title: str, first: str) -> Table:
    table = Table(title=title)
    table.add_column(first)
    for key in KEYS:
        table.add_column(f"{key} (%)", justify="right")
    return table


def result_table(result, title: str) -> Table:
    """`fmkt-cli distill --task detection`'s table: the teacher's mAP, the student's at the last epoch and at the
    epoch of its best AP."""
    table = _table(title, "model")
    teacher = result.teacher or {}
    if teacher.get("map"):
        table.add_row("teacher", *_cells(teacher["map"]))
        table.caption = f"teacher: {teacher['arch']}"
    table.add_row("student (last)", *_cells(result.last))
    if result.best and result.best.get("epoch") != result.epochs:
        table.add_row(f"student (best AP, epoch {result.best['epoch']})", *_cells(result.best))
    return table


def eval_table(res: dict) -> Table:
    """`fmkt-cli eval`'s table of a detection artifact: a row per K (or one for a plain detector)."""
    table = _table(f"{res['artifact']} on {res['dataset']} ({res['images']} val images, {res['precision']})", "K")
    for key, values in res["map"].items():
        table.add_row(step_label(key), *_cells(values))
    return table
