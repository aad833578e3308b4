"""The Python API for your own models: FM-KT around *your* teacher and student ``nn.Module``s and DataLoader.

    import fmkt
    fm = fmkt.FMKT(student, teacher, example=images)     # channels and classes from this one batch
    opt = torch.optim.SGD(fm.parameters(), lr=0.05, momentum=0.9)   # trainables only (never the teacher)
    for images, labels in loader:                          # your loop ...
        loss = fm.loss(images, labels)
        opt.zero_grad(); loss.backward(); opt.step()
    fm.fit(loader, epochs=10)                              # ... or ours (SGD + cosine, as the CLI trains)
    fm.evaluate(test_loader, steps=[1, 2, 4])              # {1: top-1 %, 2: ..., 4: ...}
    fm.save("runs/mine/artifact")                          # the standard artifact (fmkt.json + safetensors)
    fmkt.export_artifact("runs/mine/artifact", steps=4)    # ONNX with K = 4 unrolled, parity checked

The student becomes the one deployable module (``fm.model``, a DeployableModel) through a ModuleAdapter
(``fmkt.wrap_student``; see fmkt/models/adapter.py for how the feature map and the head are found). The distiller is
the CLI's own (``build_distiller``): the same method, losses and sampler; ``fit`` runs the engine's epoch loop
(fmkt.loop) and step (fmkt.step, fmkt.capture). This module imports neither the engine (rich, checkpoints, logs)
nor fmkt.commands (the CLI's composition root sits above the library, not under it).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from fmkt.artifact import run_record, save_artifact
from fmkt.capture import MODES as FAST_PATH_MODES
from fmkt.capture import fast_path_plan, make_step
from fmkt.config import Config, OptimConfig, apply_overrides, validate_method
from fmkt.distillers import METHODS, build_distiller, check_method_names, check_name
from fmkt.errors import FmktError
from fmkt.evaluation import count_correct, eval_keys
from fmkt.import_paths import import_path_of, well_formed
from fmkt.loop import run_epoch
from fmkt.meter import epoch_record
from fmkt.models import list_models
from fmkt.models.adapter import ModuleAdapter, is_zoo_backbone
from fmkt.models.timm_backbone import TimmBackbone
from fmkt.optim import build_optimizer, build_scheduler, epoch_lr, scheduled_lr
from fmkt.runtime import FP32
from fmkt.student import DeployableModel, StudentSpec, build_student, spec_of
from fmkt.teacher import teacher_sha256


def _images(example) -> torch.Tensor:
    """The dry-run batch: images (B, C, H, W), an (images, labels, ...) batch, or a DataLoader (its first batch)."""
    if isinstance(example, torch.utils.data.DataLoader):
        example = next(iter(example))
    if isinstance(example, (tuple, list)) and example:
        example = example[0]
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise FmktError("example must be a batch of images (B, C, H, W), an (images, labels) batch or a DataLoader.")
    return example[:8].float()


def _stats(mean, std, channels: int) -> tuple[list, list]:
    mean = [0.0] * channels if mean is None else list(mean)
    std = [1.0] * channels if std is None else list(std)
    if len(mean) != channels or len(std) != channels:
        raise FmktError(f"mean and std need {channels} values, one per image channel.")
    return mean, std


def wrap_student(model: nn.Module, example, *, feature_layer: str | None = None, classifier: str | None = None,
                 check_head: bool = True) -> ModuleAdapter:
    """Your model with the zoo interface, found on ``example`` (see :class:`fmkt.models.adapter.ModuleAdapter`).

    ``adapter.options`` says which layer gives the feature map and which nn.Linear is the head;
    ``adapter.num_features`` / ``adapter.num_classes`` what the dry run found. Refused in one sentence
    (FmktError) when the logits are not pool + linear of that map (FM-KT's shape map S must be).
    """
    images = _images(example)
    device = next(iter(model.parameters()), images).device
    return ModuleAdapter(model, images.to(device), feature_layer=feature_layer, classifier=classifier,
                         check_head=check_head)


class FMKT(nn.Module):
    """FM-KT (or any fmkt method) around your ``student`` and ``teacher`` modules.

    - ``student``: any nn.Module returning logits whose last step is global average pooling + an nn.Linear;
      the feature map comes from its ``forward_features`` or from the submodule ``feature_layer`` (found on the
      dry run when not named), the head is ``classifier`` (default: the last nn.Linear).
    - ``teacher``: any nn.Module returning logits (frozen, eval mode); ``teacher_feature_layer`` names its map for
      ``transfer="features"``. ``None`` for the teacher-free methods (``ofmkt``, ``none``).
    - ``example``: one batch (or a DataLoader): channels, size and classes come from it.
    - ``mean``/``std``: per-channel normalisation folded into both models (the deployable student and its
      export then take raw images); default none: both models get the images exactly as your loader yields them.
    - ``arch``: the ``pkg.module:factory`` that rebuilds the student when the artifact is loaded (``eval``,
      ``export``, ``bench``); default the student's class, called with ``num_classes``/``in_channels`` when it
      takes them, plus ``arch_kwargs``.
    - ``method``, ``loss``, ``encoder``, ``schedule``, ``train_steps``, ``transfer`` and any other key of the
      config's ``method`` section (``dirac_ratio``, ``loss_weight``, ``ce_weight``, ``encoder_params``, ...).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, example, *, method: str = "fmkt",
                 loss: str = "dist", encoder: str = "conv", schedule: str = "rectified", train_steps=8,
                 transfer: str = "logits", feature_layer: str | None = None, classifier: str | None = None,
                 teacher_feature_layer: str | None = None, mean=None, std=None, arch: str | None = None,
                 arch_kwargs: dict | None = None, **method_options):
        super().__init__()
        cfg = apply_overrides(Config(), {"method": {"name": method, "loss": loss, "encoder": encoder,
                                                    "schedule": schedule, "train_steps": train_steps,
                                                    "transfer": transfer, **method_options}}).method
        cfg = validate_method(cfg)
        check_method_names(cfg)
        images = _images(example)
        mean, std = _stats(mean, std, images.shape[1])
        normed = (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        timm_student = isinstance(student, TimmBackbone)  # fmkt.create_model("timm:NAME", ...)
        self.arch = arch or (student.arch if timm_student else import_path_of(type(student)))
        if timm_student:
            arch_kwargs = {**student.arch_kwargs, **(arch_kwargs or {})}
        self.input_shape = tuple(images.shape[1:])
        self.method = cfg
        flow = METHODS[method].flow
        if (is_zoo_backbone(student) and arch in list_models()) or timm_student:
            backbone = student  # a zoo model named by arch="resnet8", or timm's: no adapter needed
        else:
            backbone = wrap_student(student, normed, feature_layer=feature_layer, classifier=classifier,
                                    check_head=flow)
        facts = self._facts(self.arch, backbone, mean, std, arch_kwargs=dict(arch_kwargs or {}))
        self.model = build_student(StudentSpec.for_method(cfg, METHODS[method], **facts), backbone=backbone)
        teacher_model, self.teacher_info = None, None
        if METHODS[method].needs_teacher:
            teacher_model = self._teacher(teacher, normed, mean, std, teacher_feature_layer, method)
        self.distiller = build_distiller(cfg, self.model, teacher_model, input_shape=self.input_shape)
        self.metrics: dict = {}

    def _facts(self, arch: str, backbone: nn.Module, mean, std, **fields) -> dict:
        """A spec's architecture, classes and input (the method's fields come from StudentSpec.for_method)."""
        classes = getattr(backbone, "num_classes", None) or backbone.get_classifier().out_features
        return dict(arch=arch, num_classes=classes, channels=self.input_shape[0], size=self.input_shape[1:],
                    mean=tuple(mean), std=tuple(std), **fields)

    def _teacher(self, teacher, normed, mean, std, feature_layer, method) -> DeployableModel:
        """The frozen teacher as a plain deployable model, and fmkt.json's record of it."""
        if teacher is None:
            raise FmktError(f"method {method!r} needs a teacher; pass teacher=your_model (or method='ofmkt').")
        wrapped = wrap_student(teacher, normed, feature_layer=feature_layer, check_head=False)
        model = build_student(StudentSpec(**self._facts(import_path_of(type(teacher)), wrapped, mean, std)),
                              backbone=wrapped)
        if model.num_classes != self.model.num_classes:
            raise FmktError(f"the teacher gives {model.num_classes} logits but the student "
                            f"{self.model.num_classes}; both must predict the same classes.")
        self.teacher_info = {"arch": import_path_of(type(teacher)), "sha256": teacher_sha256(module=teacher),
                             "source": "python (fmkt.FMKT)", "accuracy": None}
        return model

    # -- training ------------------------------------------------------------------------------------------
    def loss(self, images: torch.Tensor, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        """The method's training loss on one batch (call ``.backward()`` on it); ``progress`` = fractional epoch
        (only DKD's warm-up reads it). The parts are in ``self.last_losses``."""
        _, losses = self.distiller(images, labels, progress)
        self.last_losses = {k: float(v.detach()) for k, v in losses.items()}
        return sum(losses.values())

    def forward(self, images, labels, progress: float = 0.0) -> torch.Tensor:
        return self.loss(images, labels, progress)

    def parameters(self, recurse: bool = True):
        """What the optimiser must update: the student, meta-encoder, time embedding (and what the method adds);
        never the teacher."""
        return (p for p in super().parameters(recurse) if p.requires_grad)

    def fit(self, loader, epochs: int = 10, *, lr: float = 0.05, optimizer: str = "sgd", weight_decay: float = 5e-4,
            test_loader=None, eval_steps=None, log=print, amp: bool = False, fast_path: str = "off") -> list[dict]:
        """fmkt's training recipe on your DataLoader: SGD (Nesterov 0.9) or AdamW, cosine LR per step, and the
        engine's epoch loop (fmkt.loop: its step, its reads of the losses, its NaN/Inf sentence); evaluates on
        ``test_loader`` after each epoch when given. ``amp``: bf16 autocast on CUDA (the CLI's ``train.amp``);
        ``fast_path`` ``auto``/``on``: the step captured as one CUDA graph where the method allows it (the CLI's
        ``train.fast_path``; it needs batches of one shape, a DataLoader with ``drop_last=True``). Both are off by
        default: eager fp32 steps. Returns one record per epoch (metrics.jsonl's keys; ``top1`` as :meth:`evaluate`
        returns it)."""
        cfg = Config(method=self.method, optim=OptimConfig(name=optimizer, lr=lr, weight_decay=weight_decay))
        cfg.train.epochs = epochs
        iters = max(len(loader), 1)
        step = self._step(cfg, iters, amp, fast_path, getattr(loader, "drop_last", False), log)
        history = []
        for epoch in range(epochs):
            self.train()
            t0 = time.perf_counter()
            meter = run_epoch(step, loader, epoch, iters, self.device, lambda s: scheduled_lr(cfg, s, iters),
                              on_read=lambda records: setattr(self, "last_losses", records[-1].losses))
            record = epoch_record(epoch, epoch_lr(cfg, epoch, iters), meter.sums, meter.seen, time.perf_counter() - t0)
            if test_loader is not None:
                record["top1"] = self.evaluate(test_loader, eval_steps)
            history.append(record)
            if log:
                log(f"epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.4f}"
                    + (f"  top-1 {record['top1']}" if "top1" in record else ""))
        return history

    def _step(self, cfg: Config, iters: int, amp: bool, fast_path: str, same_shapes: bool, log):
        """fit's step and its optimiser: fmkt.capture.make_step's, as the engine decides it (one process)."""
        check_name(fast_path, FAST_PATH_MODES, "fast_path")
        plan = fast_path_plan(fast_path, cfg, self.device, 1, METHODS[self.method.name])
        if plan.capture and not same_shapes:
            plan = replace(plan, capture=False, line="fast path: eager training step (a captured step needs batches "
                                                     "of one shape: a DataLoader with drop_last=True)")
        say = SimpleNamespace(print=lambda line, **_: log(line) if log else None)
        if fast_path != "off" and self.device.type == "cuda":
            say.print(plan.line)
        opt = build_optimizer(cfg, self.named_parameters(), device_lr=plan.capture or None, capturable=plan.capture)
        run = SimpleNamespace(cfg=cfg, model=self.distiller, optimizer=opt, scheduler=build_scheduler(cfg, opt, iters),
                              amp=amp and self.device.type == "cuda", console=say)
        return make_step(run, plan)

    # -- evaluation and saving -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def evaluate(self, loader, steps=None) -> dict:
        """Top-1 (%) of the deployable student on ``loader`` at each K (``{1: 95.0, 2: ...}``; 0 = the theta head;
        ``{"student": ...}`` for a plain student). Also kept for :meth:`save`."""
        steps = self.method.eval_steps if steps is None else list(steps)
        keys = eval_keys(self.model, steps)
        correct, total = count_correct(self.model, loader, keys, self.device)
        self.metrics = {k: 100.0 * correct[k] / max(total, 1) for k in keys}
        return {("student" if k == "plain" else int(k)): v for k, v in self.metrics.items()}

    def predict(self, images: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Logits of the deployable student at K = ``steps`` (default: the largest training N), no gradients."""
        was_training = self.model.training
        with torch.no_grad():
            out = self.model.eval()(images.to(self.device), steps)
        self.model.train(was_training)
        return out

    def save(self, path: str | Path, *, dataset: str | None = None) -> Path:
        """Write the standard artifact (``fmkt-cli eval``/``export``/``bench`` take it). ``dataset``: a dataset name
        or data import path, so ``eval`` and the export's parity check use its test split."""
        arch = self.arch
        if ":" in arch and not well_formed(arch):
            raise FmktError(f"the student's class {arch!r} cannot be imported back (defined inside a function?); "
                            "pass arch='pkg.module:factory' to fmkt.FMKT.")
        record = run_record(self.method, teacher=self.teacher_info, source="python API (fmkt.FMKT)",
                            dataset={"name": dataset, "num_classes": self.model.num_classes, "class_names": None},
                            metrics={"last": dict(self.metrics), "best": dict(self.metrics), "precision": FP32})
        return save_artifact(path, self.model, spec_of(self.model).to_json(), record)


def export_artifact(artifact: str | Path, steps: int, fmt: str = "onnx", *, check: bool = True, **options):
    """``fmkt-cli export`` from Python: the artifact with K = ``steps`` as one static graph (``fmt`` onnx | trt |
    aoti) + export.json + parity.json; ``options``: precision, batch, opset, out, force, device. Raises
    ParityError when the graph breaches the parity gate (``check=False`` returns the result instead)."""
    from fmkt.export import run_export

    result = run_export(artifact, steps, fmt, **options)
    if check:
        result.raise_for_status()
    return result
