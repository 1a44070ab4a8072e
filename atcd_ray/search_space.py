"""A Ray Tune search space file (``SearchSpace``), read and checked against the recipe's config
before Ray starts: every key and every value a trial can take. No Ray here; ``sweep.py`` runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, load_config

# What a trial reports each epoch that a space may score trials by (trainer.fit's record).
REPORTED = ("val_robust_acc", "val_clean_acc", "train_images_per_second", "train_loss", "train_seconds")
REPEAT = "repeat"
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SPACE_KEYS = ("study", "dataset", "recipe", "fixed", "params", "metric", "mode", "searcher", "points_to_evaluate",
              "scheduler", "num_samples", "search_seed")
SEARCHERS = ("random", "tpe", "bohb")
SCHEDULERS = ("asha", "fifo", "hyperband")  # hyperband: HyperBandForBOHB, searcher bohb's own


@dataclass
class SearchSpace:
    """A search space file, validated."""

    study: str  # the name: the default output is runs/sweeps/<study>
    dataset: str
    params: dict[str, dict[str, list]]  # config key (or a bundle's label) -> {kind: values}
    recipe: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    metric: dict[str, float] = field(default_factory=lambda: {"val_robust_acc": 1.0})  # weights
    mode: str = "max"
    searcher: str = "random"  # random (grids too) | tpe (Optuna) | bohb (TuneBOHB + HyperBandForBOHB)
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)  # the searcher's fixed first trials
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    num_samples: int = 1
    search_seed: int | None = None  # seeds the searcher, so a rerun samples the same trials (none: drawn, recorded)

    def __post_init__(self):
        if self.recipe:  # relative to where the command runs: Tune runs each trial in a directory of its own
            self.recipe = str(Path(self.recipe).resolve())

    def bundles(self, name: str) -> dict[str, dict] | None:
        """A param whose values are mappings of overrides (e.g. T and K together): label -> mapping."""
        (kind, values), = self.params[name].items()
        if kind in ("grid", "choice") and isinstance(values[0], dict):
            return {bundle_label(v): v for v in values}
        return None

    def config(self, overrides: list[tuple[str, Any]] = ()):
        """The recipe, then ``fixed``, then ``overrides``."""
        return load_config(self.dataset, self.recipe, [*self.fixed.items(), *overrides])

    def trial_overrides(self, trial_config: dict) -> list[tuple[str, Any]]:
        """``fixed``, then each param's sampled value (a bundle's label expands to its overrides)."""
        overrides = list(self.fixed.items())
        for name, value in trial_config.items():
            if name == REPEAT:
                continue
            bundles = self.bundles(name)
            overrides += list(bundles[value].items()) if bundles else [(name, _plain(value))]
        return overrides

    def tune_points(self) -> list[dict[str, Any]]:
        """``points_to_evaluate`` as the searcher takes them: a bundle's mapping becomes its label."""
        points = []
        for point in self.points_to_evaluate:
            points.append({name: bundle_label(value) if isinstance(value, dict) else value
                           for name, value in point.items()})
        return points


def _plain(value):
    """A searcher's numpy scalar (BOHB's) as the Python number the config checks expect."""
    return value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value


def bundle_label(overrides: dict) -> str:
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items())


def read_spec(path: Path, what: str) -> dict:
    """A YAML file of a search space or a budget study, as a mapping, or one ConfigError line why not."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping")
    return tree


def check_keys(tree: dict, path: Path, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    """No key outside ``allowed``, every key of ``required``: the first offender, by name."""
    unknown = sorted(set(tree) - set(allowed))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key in {path.name}; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in tree:
            raise ConfigError(f"{key}: required in {path.name}")


def load_search_space(path: str | Path, extra: list[tuple[str, Any]] = ()) -> SearchSpace:
    """Read and check a space file: every key and every value a trial can take is validated
    against the recipe's config, so a bad space fails here, with the key, before Ray starts."""
    path = Path(path)
    tree = read_spec(path, "search space")
    if "budgets" in tree:
        raise ConfigError(f"{path} is a budget study: run it with python -m atcd_ray.study {path}")
    if "search" in tree:
        raise ConfigError(f"search: renamed searcher: {' | '.join(SEARCHERS)} (auto and optuna: tpe; basic: random)")
    check_keys(tree, path, SPACE_KEYS, ("study", "dataset", "params"))
    metric = tree.get("metric", "val_robust_acc")
    tree["metric"] = {metric: 1.0} if isinstance(metric, str) else metric
    if tree.get("searcher") == "bohb" and "scheduler" not in tree:
        tree["scheduler"] = {"name": "hyperband"}
    space = SearchSpace(**tree)
    check_search_space(space, list(extra))
    return space


def check_search_space(space: SearchSpace, extra: list[tuple[str, Any]]) -> None:
    """Every key of a space and every value a trial can take, against the recipe's config: the
    first offender, as one ConfigError naming its key."""
    if not isinstance(space.params, dict) or not space.params:
        raise ConfigError("params: give at least one searched key")
    if not isinstance(space.fixed, dict):
        raise ConfigError("fixed: expected a mapping of config key to value")
    if not isinstance(space.metric, dict) or not space.metric or any(
            k not in REPORTED or not isinstance(w, (int, float)) for k, w in space.metric.items()):
        raise ConfigError(f"metric: a name or a mapping of name to weight, names from: {', '.join(REPORTED)}")
    if space.mode not in ("max", "min"):
        raise ConfigError(f"mode: must be max or min, got {space.mode!r}")
    if space.searcher not in SEARCHERS:
        raise ConfigError(f"searcher: must be one of {', '.join(SEARCHERS)}; got {space.searcher!r}")
    if not isinstance(space.num_samples, int) or space.num_samples < 1:
        raise ConfigError(f"num_samples: must be an integer >= 1, got {space.num_samples!r}")
    seed = space.search_seed
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"search_seed: must be an integer, got {space.search_seed!r}")
    _check_scheduler(space)

    def try_config(overrides, where):
        try:
            space.config([*overrides, *extra])
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    try_config([], "fixed")
    if REPEAT in space.params:
        raise ConfigError(f"params.{REPEAT}: reserved for the repeats of a grid (num_samples)")
    for name, spec in space.params.items():
        where = f"params.{name}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)}, e.g. {{grid: [1, 2, 4]}}")
        (kind, values), = spec.items()
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}: empty; give a non-empty list")
        if kind in ("grid", "choice"):
            for value in values:
                bundle = isinstance(value, dict)
                if bundle != isinstance(values[0], dict) or (bundle and not value):
                    raise ConfigError(f"{where}.{kind}: mix of mappings and values, or an empty mapping")
                try_config(list(value.items()) if bundle else [(name, value)], where)
            continue
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not values[0] < values[1]:
            raise ConfigError(f"{where}.{kind}: expected [low, high] with low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{where}.loguniform: low must be > 0, got {values[0]}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"{where}.randint: bounds must be integers, got {values}")
        for value in values:
            try_config([(name, value)], where)
    if space.searcher != "random" and has_grid(space):
        raise ConfigError(f"searcher: {space.searcher} samples; it cannot run a grid (use choice, or searcher: random)")
    _check_points(space, try_config)


def _check_scheduler(space: SearchSpace) -> None:
    scheduler = dict(space.scheduler or {})
    name = scheduler.pop("name", None)
    if name not in SCHEDULERS or set(scheduler) - {"grace_period", "reduction_factor"}:
        raise ConfigError("scheduler: {name: asha|fifo|hyperband, grace_period: EPOCHS, reduction_factor: R}")
    if (name == "hyperband") != (space.searcher == "bohb"):
        raise ConfigError("scheduler: searcher bohb runs with {name: hyperband} (HyperBandForBOHB, the default with "
                          "bohb), and hyperband only with searcher bohb")


def _check_points(space: SearchSpace, try_config) -> None:
    """Each fixed first trial gives every searched key one value the space can take (a bundle: one
    of its mappings, as the space writes it), and that value passes the config's checks."""
    points = space.points_to_evaluate
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError("points_to_evaluate: expected a list of mappings of searched key to value")
    if points and has_grid(space):
        raise ConfigError("points_to_evaluate: a grid runs every value already; fixed trials are for sampled params")
    for i, point in enumerate(points):
        for name in point:
            if name not in space.params:
                raise ConfigError(f"points_to_evaluate[{i}].{name}: not a searched key; "
                                  f"params: {', '.join(space.params)}")
        for name, spec in space.params.items():
            where = f"points_to_evaluate[{i}].{name}"
            if name not in point:
                raise ConfigError(f"{where}: missing; a fixed trial gives every searched key a value")
            (kind, values), = spec.items()
            value = point[name]
            bundles = space.bundles(name)
            if bundles:
                if not (value in values if isinstance(value, dict) else isinstance(value, str) and value in bundles):
                    raise ConfigError(f"{where}: {value!r} is not one of the bundle's {kind} values")
                value = bundles[value] if isinstance(value, str) else value
                try_config(list(value.items()), where)
                continue
            if kind == "choice":
                fits = any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in values)
            else:
                number = isinstance(value, int if kind == "randint" else (int, float)) and not isinstance(value, bool)
                fits = number and values[0] <= value <= values[1]
            if not fits:
                raise ConfigError(f"{where}: {value!r} is not in the space ({kind}: {values})")
            try_config([(name, value)], where)


def has_grid(space: SearchSpace) -> bool:
    return any(next(iter(s)) == "grid" for s in space.params.values())
