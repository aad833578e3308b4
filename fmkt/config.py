"""The typed run configuration: YAML files and ``--set a.b=v`` overrides map onto these dataclasses.

Unknown keys are rejected with the valid ones named. The CLI options are shortcuts for the same keys.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from fmkt.errors import FmktError


@dataclass
class DataConfig:
    name: str = "digits"
    dir: str | None = None  # dataset folder (default per dataset)
    batch_size: int = 64
    eval_batch_size: int = 256
    augment: bool = True
    train_subset: int | None = None  # seeded subset of the training split (small CPU runs)
    test_subset: int | None = None


@dataclass
class TeacherConfig:
    path: str | None = None  # our artifact folder, or a .pt/.pth/.safetensors state dict
    arch: str = "wrn_16_2"  # architecture (zoo name or pkg.module:factory) of a state-dict file / the default teacher
    options: dict = field(default_factory=dict)  # import-path teacher: feature_layer, classifier (see fmkt.adapter)
    key_map: dict = field(default_factory=dict)  # prefix renames {old: new} applied to a state-dict file's keys
    epochs: int = 15  # when distill trains the default teacher itself
    lr: float = 0.05


@dataclass
class MethodConfig:
    name: str = "fmkt"  # none | kd | dkd | dist | fmkt | theta | ofmkt
    loss: str = "dist"  # metric loss D of the FM-KT family: kd | dkd | dist | pkd | mse
    loss_params: dict = field(default_factory=dict)  # e.g. {temperature: 4.0} for kd
    loss_weight: float = 1.0  # w
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    online_label_smoothing: float = 0.1  # OFM-KT's per-step CE
    encoder: str = "conv"  # conv | mlp | transformer
    encoder_params: dict = field(default_factory=dict)
    schedule: str = "rectified"  # rectified | vp | ve
    transfer: str = "logits"  # logits | features (PKD velocity regression on the last feature map)
    train_steps: str = "8"  # N, or a comma list drawn per iteration ("1,2,4,8,16")
    eval_steps: list = field(default_factory=lambda: [1, 2, 4, 8])
    dirac_ratio: float = 1.0
    theta_weight: float = 1.0
    dkd_warmup_epochs: float = 20.0

    def train_step_choices(self) -> list[int]:
        return parse_int_list(str(self.train_steps), "method.train_steps", minimum=1)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (Nesterov momentum) | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    scheduler: str = "cosine"  # cosine | multistep
    milestones: list = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1
    warmup_epochs: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 15
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    checkpoint_every_steps: int = 0  # 0: a checkpoint at the end of every epoch only
    threads: int = 0  # torch CPU threads; 0 = torch's default
    kernel: str = "auto"  # flow-step kernels: auto (Triton on CUDA, else torch) | triton | torch


@dataclass
class Config:
    student: str = "resnet8"  # a zoo name or an import path pkg.module:factory
    student_options: dict = field(default_factory=dict)  # import-path student: feature_layer, classifier
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/distill"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_int_list(text, key: str, minimum: int = 0) -> list[int]:
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [s for s in str(text).replace(" ", "").split(",") if s]
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
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


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
        raise FmktError(f"config file {p} is not valid YAML ({str(exc).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise FmktError(f"config file {p} must hold a mapping of keys, not {type(data).__name__}.")
    return data


def build_config(config_file: str | None = None, overrides: list[dict] | None = None, base: Config | None = None) -> Config:
    """Defaults <- config file <- each override dict in order (CLI shortcuts, then --set)."""
    cfg = base or Config()
    if config_file:
        apply_overrides(cfg, read_config_file(config_file))
    for data in overrides or []:
        apply_overrides(cfg, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check every name and range up front, before anything is trained."""
    from fmkt.adapter import ADAPTER_OPTIONS
    from fmkt.data import dataset_info
    from fmkt.distillers import check_method
    from fmkt.imports import is_import_path, resolve
    from fmkt.models import list_models

    check_method(cfg.method.name)
    models = list_models()
    for value, key in [(cfg.student, "student"), (cfg.teacher.arch, "teacher.arch")]:
        if is_import_path(value):
            resolve(value, f"model factory ({key})")
        elif value not in models:
            raise FmktError(f"unknown model {value!r} ({key}); choose one of {', '.join(models)} or give an "
                            "import path pkg.module:factory.")
    for options, key in [(cfg.student_options, "student_options"), (cfg.teacher.options, "teacher.options")]:
        bad = sorted(set(options) - set(ADAPTER_OPTIONS))
        if bad:
            raise FmktError(f"unknown config key '{key}.{bad[0]}'; valid keys here: {', '.join(ADAPTER_OPTIONS)}.")
    info = dataset_info(cfg.data.name, cfg.data.dir)
    for arch, options in [(cfg.student, cfg.student_options), (cfg.teacher.arch, cfg.teacher.options)]:
        if is_import_path(arch):  # the factory runs and its model takes one dry-run batch, before any work
            from fmkt.adapter import create_backbone

            create_backbone(arch, num_classes=info.num_classes, in_channels=info.in_channels,
                            input_size=info.image_size, options=options, check_head=False)
    validate_method(cfg.method)
    _check_names([
        (cfg.optim.name, ("sgd", "adamw"), "optim.name"),
        (cfg.optim.scheduler, ("cosine", "multistep"), "optim.scheduler"),
        (cfg.train.kernel, ("auto", "triton", "torch"), "train.kernel"),
    ])
    for value, key in [(cfg.train.epochs, "train.epochs"), (cfg.data.batch_size, "data.batch_size"),
                       (cfg.data.eval_batch_size, "data.eval_batch_size"), (cfg.train.eval_every, "train.eval_every")]:
        if value < 1:
            raise FmktError(f"{key} must be >= 1, got {value}.")
    if cfg.optim.lr <= 0:
        raise FmktError(f"optim.lr must be > 0, got {cfg.optim.lr}.")


def validate_method(m: MethodConfig) -> None:
    """The method section alone (the Python API builds one without a whole Config)."""
    from fmkt.distillers import check_method

    check_method(m.name)
    m.train_step_choices()
    m.eval_steps = parse_int_list(m.eval_steps, "method.eval_steps", minimum=0)
    if not 0.0 <= m.dirac_ratio <= 1.0:
        raise FmktError(f"method.dirac_ratio must be in [0, 1], got {m.dirac_ratio}.")
    _check_names([
        (m.encoder, ("conv", "mlp", "transformer"), "method.encoder"),
        (m.schedule, ("rectified", "vp", "ve"), "method.schedule"),
        (m.loss, ("kd", "dkd", "dist", "pkd", "mse"), "method.loss"),
        (m.transfer, ("logits", "features"), "method.transfer"),
    ])
    if m.transfer == "features" and m.name != "fmkt":
        raise FmktError(f"method.transfer=features works with method fmkt only (method {m.name!r} distills "
                        "logits: theta's head and OFM-KT's ensemble target are logits); use method.transfer=logits "
                        "or --method fmkt.")


def _check_names(checks) -> None:
    for value, allowed, key in checks:
        if value not in allowed:
            raise FmktError(f"unknown {key.split('.')[-1]} {value!r} ({key}); choose one of {', '.join(allowed)}.")


def save_config(cfg: Config, path: Path) -> None:
    from fmkt.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(data: dict) -> Config:
    return apply_overrides(Config(), data)
