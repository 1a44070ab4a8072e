"""Typed, validated configuration: one YAML recipe per dataset and model in ``pipelines/``.

A recipe is read into ``Config``; then ``per_method[<method>]`` of the recipe (the paper trains
PGD-AT on another schedule than the fast methods), then the command line (``--eps``, ``--set
key=value``...). An unknown key or a bad value raises ``ConfigError`` naming the key and what
is allowed, before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .core.attacks import build_attack
from .core.methods import METHODS
from .core.models import MODELS
from .data import DATASETS

RECIPES_DIR = Path(__file__).resolve().parent.parent / "pipelines"


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and what is allowed."""


@dataclass
class DataConfig:
    dir: str | None = None  # None: the dataset's default location
    batch_size: int = 128
    val_size: int = 5000  # held out from the training set, for best-checkpoint selection
    subset: int | None = None  # train on the first N training examples
    loader_workers: int = 4  # worker processes (threads for FFCV) decoding JPEGs
    ffcv_dir: str | None = None  # DIR with train.beton and val.beton (atcd_ray.write_ffcv); None: torchvision
    pin_memory: bool = True  # on CUDA: batches through page-locked memory, copied without blocking

    def validate(self):
        _positive(self, "batch_size", "subset")
        if self.val_size < 0 or self.loader_workers < 0:
            raise ValueError("val_size and loader_workers must be >= 0")


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "piecewise"  # constant | piecewise | cyclic | cosine, over epochs (fractional within one)
    milestones: list[float] = field(default_factory=list)  # piecewise: epochs where lr *= gamma
    gamma: float = 0.1
    warmup_fraction: float = 0.4  # cyclic: where the triangle peaks, as a fraction of training

    def validate(self):
        _choice(self, "name", ("sgd", "adam"))
        _choice(self, "schedule", ("constant", "piecewise", "cyclic", "cosine"))
        _positive(self, "lr")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1 or not 0 < self.warmup_fraction < 1:
            raise ValueError("need weight_decay >= 0, 0 <= momentum < 1, 0 < warmup_fraction < 1")


@dataclass
class TrainConfig:
    method: str = "atcd"
    epochs: int = 10  # sweeps over the training data (Free-m and ATCD recipes divide the paper's N)
    # Compute in natural-epoch equivalents (forward+backward passes over the training set); when
    # set it decides epochs: budget / the method's passes a minibatch, the last one a fraction of
    # an epoch where they do not divide it (Config.epochs_to_train).
    budget: float | None = None
    amp: bool = False  # training under torch.autocast with bfloat16 (the GPU recipes turn it on)
    channels_last: bool = False  # model and images in channels-last memory format (GPU tensor cores)
    compile: bool = False  # torch.compile the model (in place: checkpoints keep their keys)
    select_best: str = "last"  # last | robust_val: keep the checkpoint with the best validation robust accuracy
    val_n: int | None = 1000  # validation examples evaluated after each validated epoch
    val_attack: str = "pgd10"
    # Validate after every N-th epoch and after the last one (a search that selects by the last
    # epoch's validation need not pay for the others; Tune sees the validated epochs only).
    val_every: int = 1
    progress_seconds: float = 5.0  # a progress line (or bar update) at most this often during an epoch
    # A checkpoint every N steps inside an epoch too (None: at epoch ends only); a resume continues
    # the epoch at the step after it, with the same batches and statistics.
    checkpoint_steps: int | None = None
    # Under Ray: every N steps the workers ask Ray whether a node of theirs is being preempted
    # (a collective, hence not every step); on a notice they checkpoint at once.
    preemption_check_steps: int = 10
    # Under Ray: each epoch's validation runs as a Ray task on the epoch's checkpoint (Ray Train's
    # ValidationConfig), with val_cpus CPUs and val_gpus GPUs of its own, while the workers train
    # on; off, and always in-process (--workers 0): the workers validate between epochs.
    val_async: bool = False
    val_cpus: float = 1.0
    val_gpus: float = 0.0
    # Weight averaging: the decay of an exponential moving average of the weights (and BatchNorm
    # statistics) updated after every optimiser step; when set, validation, best-checkpoint
    # selection and the final test use the average (the raw weights are validated beside it).
    ema: float | None = None

    def validate(self):
        _choice(self, "method", tuple(METHODS))
        _choice(self, "select_best", ("last", "robust_val"))
        _positive(self, "epochs", "budget", "val_n", "val_every", "progress_seconds", "checkpoint_steps",
                  "preemption_check_steps", "val_cpus")
        if self.val_gpus < 0:
            raise ValueError(f"val_gpus must be >= 0, got {self.val_gpus}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must be a decay between 0 and 1 (exclusive), e.g. 0.999; got {self.ema:g}")


@dataclass
class EvalConfig:
    n: int | None = None  # first N test examples; None: all
    attacks: list[str] = field(default_factory=lambda: ["pgd20", "mifgsm20", "cw20"])
    batch_size: int = 256
    amp: bool = False  # attacks in bfloat16 too; off: evaluation stays in float32 whatever train.amp is

    def validate(self):
        _positive(self, "n", "batch_size")


@dataclass
class Config:
    dataset: str = "fashion-mnist"
    model: str = "smallcnn"
    eps: float = 0.1  # L-inf radius, inputs in [0, 1]
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Options of every method, by name; only the selected one is used.
    methods: dict[str, Any] = field(default_factory=lambda: {n: m.Options() for n, m in METHODS.items()})
    # Recipe-level overrides applied when a method is selected, e.g. {pgd: {"train.epochs": 105}}.
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self):
        _choice(self, "dataset", tuple(DATASETS))
        _choice(self, "model", tuple(MODELS))
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        for name in [self.train.val_attack, *self.eval.attacks]:
            build_attack(name, self.eps)
        if self.train.budget is not None:  # the epochs begun: the last may be a fraction (epochs_to_train)
            self.train.epochs = math.ceil(self.train.budget / self.passes_per_minibatch - 1e-9)

    @property
    def epochs_to_train(self) -> float:
        """Epochs (sweeps over the training data), fractional under a budget that the method's
        passes per minibatch do not divide: the last epoch then stops part-way (its first steps), and the
        learning-rate schedule, laid over these epochs, ends there. Without a budget, train.epochs."""
        if self.train.budget is None:
            return float(self.train.epochs)
        return self.train.budget / self.passes_per_minibatch

    @property
    def passes_per_minibatch(self) -> int:
        return METHODS[self.train.method].passes(self.method_options)

    @property
    def method_options(self):
        return self.methods[self.train.method]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _choice(obj, name, allowed):
    if getattr(obj, name) not in allowed:
        raise ValueError(f"{name} must be one of: {', '.join(allowed)}; got {getattr(obj, name)!r}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type hint (int -> float allowed), recursing into dataclasses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        return value
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # YAML reads "5e-4" as a string
        except ValueError:
            number = None  # not a number: refused below
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return number
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _build_dataclass(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key; allowed: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        methods = cls is Config and name == "methods"
        kwargs[name] = _build_method_options(value, key) if methods else _coerce(value, hints[name], key)
    obj = cls(**kwargs)
    if cls is Config and "methods" in kwargs:  # methods a recipe leaves out keep their defaults
        obj.methods = {**Config().methods, **obj.methods}
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(f"{prefix or 'config'}: {err}") from None
    return obj


def _build_method_options(data: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of method name to options")
    for name in data:
        if name not in METHODS:
            raise ConfigError(f"{prefix}.{name}: unknown method; allowed: {', '.join(METHODS)}")
    return {name: _build_dataclass(METHODS[name].Options, opts or {}, f"{prefix}.{name}")
            for name, opts in data.items()}


def _set_dotted_key(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``0.1``, ``true``, ``[10, 20]``, ``null``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def recipe_path(dataset: str) -> Path:
    if dataset not in DATASETS:
        raise ConfigError(f"dataset: unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    return RECIPES_DIR / DATASETS[dataset].default_recipe


def load_config(dataset: str | None = None, recipe: str | Path | None = None,
                overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Recipe (default: the dataset's), then its per_method block, then ``overrides``. In a recipe
    ``train.budget`` decides the epochs; in the per_method block and the overrides the later of
    ``train.epochs`` and ``train.budget`` does (epochs set after a budget clear it)."""
    overrides = list(overrides or [])
    path = Path(recipe) if recipe else recipe_path(dataset)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe {path} is not valid YAML ({' '.join(str(err).split())})") from None
    except OSError as err:
        raise ConfigError(f"recipe {path} cannot be read ({err.strerror})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of config keys, got {type(tree).__name__}")
    if dataset is not None:
        tree["dataset"] = dataset
    method = dict(overrides).get("train.method", tree.get("train", {}).get("method", TrainConfig.method))
    per_method = tree.get("per_method", {})
    if not isinstance(per_method, dict) or any(m not in METHODS for m in per_method):
        raise ConfigError(f"per_method: keys must be methods ({', '.join(METHODS)})")
    for key, value in [*(per_method.get(method) or {}).items(), *overrides]:
        _set_dotted_key(tree, key, value)
        if key == "train.epochs":
            _set_dotted_key(tree, "train.budget", None)
    return _build_dataclass(Config, tree, "")


def config_from_dict(tree: dict) -> Config:
    """A Config from its ``to_dict`` form (a checkpoint's metadata), validated like a recipe."""
    return _build_dataclass(Config, tree, "")
