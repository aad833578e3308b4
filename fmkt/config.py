"""The typed run configuration: YAML files and ``--set a.b=v`` overrides map onto these dataclasses; unknown keys
are rejected with the valid ones named. The CLI options are shortcuts for the same keys."""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from fmkt.detection.config import DetectionConfig  # the detection task's section (plain types)
from fmkt.errors import FmktError, first_line
from fmkt.files import atomic_write_text


@dataclass
class DataConfig:
    name: str = "digits"  # a dataset of fmkt.data's registry, or pkg.module:factory
    dir: str | None = None  # dataset folder (default per dataset)
    batch_size: int = 64
    eval_batch_size: int = 256
    augment: bool = True
    train_subset: int | None = None  # seeded subset of the training split (small CPU runs)
    test_subset: int | None = None
    holdout: int | None = None  # evaluate on this many training images held out (model selection), not the test split
    # the side of the square images trained and evaluated on: an image folder's crops (None: 224); in-memory data
    # (digits, Fashion-MNIST, CIFAR, ...) is resized once when loaded (bilinear, antialiased; None: its own size)
    image_size: int | None = None
    workers: int | None = None  # imagefolder: DataLoader processes decoding images (None: min(8, CPUs per process))
    decode: str = "cpu"  # imagefolder: cpu (workers, torchvision.io) | gpu (batched nvjpeg on CUDA: torchvision.io.decode_jpeg on a list)
    mean: list = field(default_factory=list)  # per-channel mean of the raw [0, 1] images (empty: the dataset's)
    std: list = field(default_factory=list)  # per-channel std (empty: the dataset's; imagefolder: ImageNet's)
    # DeiT's augmentation from timm (fmkt.data.deit_aug, fmkt.mixing); every key off by default. Per image, after the
    # crop and flip: a timm auto-augment string ("rand-m9-mstd0.5-inc1"), random erasing's probability (mode pixel)
    # and repeated augmentation (timm's RepeatAugSampler: each image N times an epoch; 0 off). Per batch, in the
    # training step: Mixup's and CutMix's beta alpha (0 off; both on: one of them per batch), soft targets
    augment_policy: str | None = None
    reprob: float = 0.0
    repeated_aug: int = 0
    mixup: float = 0.0
    cutmix: float = 0.0


@dataclass
class TeacherConfig:
    path: str | None = None  # our artifact folder, or a .pt/.pth/.safetensors state dict
    arch: str = "wrn_16_2"  # architecture (zoo name, timm:NAME or pkg.module:factory) of a weights file / the default teacher
    options: dict = field(default_factory=dict)  # import-path teacher: feature_layer, classifier (see fmkt.models.adapter)
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the teacher's factory (timm: img_size, ...)
    key_map: dict = field(default_factory=dict)  # prefix renames {old: new} applied to a state-dict file's keys
    epochs: int = 15  # when distill trains the default teacher itself
    lr: float = 0.05


@dataclass
class MethodConfig:
    name: str = "fmkt"  # a method of fmkt.distillers.METHODS (`fmkt-cli info --models` lists every registry)
    loss: str = "dist"  # the FM-KT family's metric loss D, from fmkt.losses.LOSSES
    loss_params: dict = field(default_factory=dict)  # e.g. {temperature: 4.0} for kd
    loss_weight: float = 1.0  # w
    logit_standardization: bool = False  # LS (Sun et al., CVPR 2024): z-score student and teacher logits before D
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    online_label_smoothing: float = 0.1  # OFM-KT's per-step CE
    encoder: str = "conv"  # fmkt.flow.encoders.ENCODERS
    encoder_params: dict = field(default_factory=dict)
    schedule: str = "rectified"  # fmkt.flow.schedules.SCHEDULES
    transfer: str = "logits"  # logits | features (PKD velocity regression on the last map; methods that allow it)
    train_steps: str = "8"  # N, or a comma list drawn per iteration ("1,2,4,8,16")
    eval_steps: list = field(default_factory=lambda: [1, 2, 4, 8])
    dirac_ratio: float = 1.0
    theta_weight: float = 1.0
    dkd_warmup_epochs: float = 20.0  # DKD's min(epoch / WARMUP, 1), epochs from 1 as mdistiller (0: none)

    def train_step_choices(self) -> list[int]:
        return parse_int_list(str(self.train_steps), "method.train_steps", minimum=1)


@dataclass
class OptimConfig:
    name: str = "sgd"  # fmkt.optim.OPTIMIZERS: sgd (Nesterov momentum) | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    scheduler: str = "cosine"  # fmkt.optim.LR_SCHEDULES: cosine | multistep
    milestones: list = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0  # the warm-up's first LR as a fraction of lr (DeiT's mmcls config: 1e-3)
    min_lr: float = 0.0  # the cosine schedule's floor, an absolute LR (DeiT: 1e-5)
    no_decay: bool = False  # no weight decay on biases, norms and ViT tokens (timm's rule; DeiT's recipe)
    clip_grad: float = 0.0  # the gradients' max global norm before each update (0: no clipping; DeiT: 5)


@dataclass
class TrainConfig:
    epochs: int = 15
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    checkpoint_every_steps: int = 0  # 0: a checkpoint at the end of every epoch only
    threads: int = 0  # torch CPU threads; 0 = torch's default
    kernel: str = "auto"  # flow-step kernels, fmkt.kernels.KERNEL_MODES: auto | triton | torch
    fast_path: str = "auto"  # fmkt.capture.MODES: the GPU fast path (data on the GPU, captured step) auto | on | off
    log: str = "jsonl"  # fmkt.logs.LOGGERS: jsonl (metrics.jsonl) | tensorboard (also OUT/tensorboard: per step)


@dataclass
class Config:
    student: str = "resnet8"  # a zoo name, timm:NAME (any timm model) or an import path pkg.module:factory
    student_options: dict = field(default_factory=dict)  # import-path student: feature_layer, classifier; timm: z1
    student_kwargs: dict = field(default_factory=dict)  # keyword arguments of the student's factory (timm: img_size, ...)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/distill"
    task: str = "classification"  # fmkt.names.TASK_NAMES: classification | detection (its keys: the detection section)
    detection: DetectionConfig = field(default_factory=DetectionConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_int_list(text, key: str, minimum: int = 0) -> list[int]:
    items = list(text) if isinstance(text, (list, tuple)) else [s for s in str(text).replace(" ", "").split(",") if s]
    if not items:
        raise FmktError(f"{key} is empty; give a comma-separated list of integers such as 1,2,4,8.")
    try:
        values = [int(s) for s in items]
    except (TypeError, ValueError):
        raise FmktError(f"{key} must be a comma-separated list of integers, got {text!r}.") from None
    bad = [v for v in values if v < minimum]
    if bad:
        raise FmktError(f"{key} values must be >= {minimum}, got {bad}.")
    return values


def parse_words(text, key: str) -> list[str]:
    """A comma list of names ("eager, trt" -> ["eager", "trt"]); an empty one is refused."""
    items = [w for w in str(text).replace(" ", "").split(",") if w]
    if not items:
        raise FmktError(f"{key} is empty; give a comma-separated list.")
    return items


def _coerce(value, tp, key: str):
    """Coerce a YAML/CLI value to the annotated type, or raise a one-sentence FmktError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise FmktError(f"config key {key} cannot be empty.")
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise FmktError(f"config key {key} must be true or false, got {value!r}.")
    if tp in (int, float):
        if isinstance(value, bool):
            raise FmktError(f"config key {key} must be a number, got {value!r}.")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise FmktError(f"config key {key} must be {'an integer' if tp is int else 'a number'}, got {value!r}.") from None
        if tp is int and isinstance(value, float) and value != out:
            raise FmktError(f"config key {key} must be an integer, got {value!r}.")
        return out
    if tp is str:
        if isinstance(value, bool):  # a YAML file's bare on/off (train.fast_path: on) arrives as a boolean
            return "on" if value else "off"
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value))
        if isinstance(value, dict):
            raise FmktError(f"config key {key} must be a string, got {value!r}.")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            return [yaml.safe_load(s) for s in value.split(",") if s.strip()]
        if not isinstance(value, (list, tuple)):
            return [value]
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise FmktError(f"config key {key} must be a mapping, got {value!r}.")
        return dict(value)
    return value


def _merge(obj, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise FmktError(f"config section {prefix.rstrip('.') or 'root'} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise FmktError(f"unknown config key {full!r}; valid keys here: {', '.join(sorted(names))}.")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def apply_overrides(cfg: Config, data: dict) -> Config:
    _merge(cfg, data)
    return cfg


def parse_set(items: list[str]) -> dict:
    """["a.b=v", ...] -> nested dict, values parsed as YAML scalars (so 0.1, true, [1,2] work)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise FmktError(f"--set takes key=value, got {item!r} (for example --set optim.lr=0.1).")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw.strip()  # YAML 1.1 reads on/off/yes/no as booleans; a bool key still takes them
        _put(out, key.strip().split("."), value)
    return out


def _put(tree: dict, parts: list[str], value) -> None:
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def cli_overrides(sets: list[str] | None, **options) -> list[dict]:
    """The CLI's override dicts, in order: its options (``data__dir=x`` sets data.dir; an option left None was not
    given, so the config file's value stands), then the ``--set`` items."""
    given: dict = {}
    for dotted, value in options.items():
        if value is not None:
            _put(given, dotted.split("__"), value)
    return [given, parse_set(sets)]


def teacher_arch_option(arch: str | None, model: str | None) -> str | None:
    """--teacher-arch and --teacher-model both set teacher.arch; two different values are refused."""
    if arch and model and arch != model:
        raise FmktError(f"--teacher-arch {arch!r} and --teacher-model {model!r} disagree; give one of them.")
    return model or arch


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fmkt.recipes").iterdir() if p.name.endswith(".yaml"))


def read_config_file(path: str) -> dict:
    """A YAML file path, or the name of a shipped recipe (``fmkt-cli distill --config digits``)."""
    p = Path(path)
    if not p.exists() and not p.suffix:
        shipped = resources.files("fmkt.recipes") / f"{path}.yaml"
        if shipped.is_file():
            return yaml.safe_load(shipped.read_text()) or {}
        raise FmktError(f"config {path!r} is neither a file nor a shipped recipe ({', '.join(recipe_names())}).")
    if not p.is_file():
        raise FmktError(f"config file {p} does not exist.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FmktError(f"config file {p} is not valid YAML ({first_line(exc, None, with_type=False)}).") from None
    if not isinstance(data, dict):
        raise FmktError(f"config file {p} must hold a mapping of keys, not {type(data).__name__}.")
    return data


def build_config(config_file: str | None = None, overrides: list[dict] | None = None, base: Config | None = None) -> Config:
    """Defaults (or a copy of ``base``) <- config file <- each override dict in order (CLI shortcuts, then --set),
    with types and ranges checked. Names (methods, losses, models, datasets, ...) are checked against their
    registries by ``fmkt.commands.check_config``, which every command runs first."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if config_file:
        apply_overrides(cfg, read_config_file(config_file))
    for data in overrides or []:
        apply_overrides(cfg, data)
    return validate(cfg)


def validate(cfg: Config) -> Config:
    """Types and ranges, before anything is trained; returns ``cfg`` with its method section normalised."""
    cfg.method = validate_method(cfg.method)
    for value, key in [(cfg.train.epochs, "train.epochs"), (cfg.data.batch_size, "data.batch_size"),
                       (cfg.data.eval_batch_size, "data.eval_batch_size"), (cfg.train.eval_every, "train.eval_every")]:
        if value < 1:
            raise FmktError(f"{key} must be >= 1, got {value}.")
    if cfg.optim.lr <= 0:
        raise FmktError(f"optim.lr must be > 0, got {cfg.optim.lr}.")
    o = cfg.optim
    if not (0 <= o.warmup_start <= 1 and 0 <= o.min_lr < o.lr and o.clip_grad >= 0):
        raise FmktError(f"optim.warmup_start must be in [0, 1], optim.min_lr in [0, optim.lr) and optim.clip_grad "
                        f">= 0; got {o.warmup_start}, {o.min_lr} (lr {o.lr}), {o.clip_grad}.")
    validate_data(cfg.data)
    return cfg


def validate_data(d: DataConfig) -> None:
    """The data section's new keys: image size, workers, mean/std (numbers, one per channel, std > 0), the DeiT
    augmentation's ranges (and an even batch for Mixup/CutMix)."""
    if d.image_size is not None and d.image_size < 8:
        raise FmktError(f"data.image_size must be >= 8, got {d.image_size}.")
    if d.workers is not None and d.workers < 0:
        raise FmktError(f"data.workers must be >= 0 (0: decode in the training process), got {d.workers}.")
    for values, key in [(d.mean, "data.mean"), (d.std, "data.std")]:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise FmktError(f"{key} must be a list of numbers such as [0.485, 0.456, 0.406], got {values!r}.")
    if len(d.mean) != len(d.std):
        raise FmktError(f"data.mean has {len(d.mean)} values and data.std {len(d.std)}; give both, one per channel.")
    if any(v <= 0 for v in d.std):
        raise FmktError(f"data.std values must be > 0, got {d.std}.")
    for value, key in [(d.reprob, "data.reprob"), (d.mixup, "data.mixup"), (d.cutmix, "data.cutmix"),
                       (d.repeated_aug, "data.repeated_aug")]:
        if value < 0 or (key == "data.reprob" and value > 1):
            raise FmktError(f"{key} must be {'in [0, 1]' if key == 'data.reprob' else '>= 0 (0: off)'}, got {value}.")
    if (d.mixup or d.cutmix) and d.batch_size % 2:
        raise FmktError(f"data.mixup / data.cutmix mix each batch with its reverse (timm's Mixup), so data.batch_size "
                        f"must be even, got {d.batch_size}.")


def validate_method(m: MethodConfig) -> MethodConfig:
    """The method section's types and ranges alone (the Python API builds one without a whole Config); returns a
    copy with ``eval_steps`` as integers, leaving ``m`` as it was."""
    m.train_step_choices()
    eval_steps = parse_int_list(m.eval_steps, "method.eval_steps", minimum=0)
    if not 0.0 <= m.dirac_ratio <= 1.0:
        raise FmktError(f"method.dirac_ratio must be in [0, 1], got {m.dirac_ratio}.")
    return dataclasses.replace(m, eval_steps=eval_steps)


def save_config(cfg: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
