"""Configuration: every recipe loads; bad keys and values are one clear error before any work."""
import pytest

from atcd_ray.config import RECIPES_DIR, ConfigError, load_config, parse_override
from atcd_ray.core.methods import METHODS
from atcd_ray.core.methods.atcd import ATCDOptions


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_loads_for_every_method(recipe):
    for method in METHODS:
        cfg = load_config(recipe=RECIPES_DIR / recipe, overrides=[("train.method", method)])
        assert cfg.train.method == method and cfg.eps > 0


def test_default_recipe_and_per_method_overrides():
    cfg = load_config("fashion-mnist")  # pipelines/fashion-mnist_compactcnn.yaml: the fair study's winners
    assert (cfg.dataset, cfg.model, cfg.eps, cfg.train.method) == ("fashion-mnist", "compactcnn", 0.1, "atcd")
    atcd = cfg.method_options
    assert isinstance(atcd, ATCDOptions) and (atcd.T, atcd.K, atcd.reuse_grad) == (4, 2, True)
    # budget 12 / 8 passes (T K, reuse_grad): 1.5 epochs, the second cut half way; per_method.atcd's lr
    assert (cfg.train.epochs, cfg.epochs_to_train) == (2, 1.5) and cfg.optim.lr != 0.05
    free = load_config("fashion-mnist", overrides=[("train.method", "free")])
    assert free.train.epochs == 2 and free.method_options.replays == 6
    # The command line wins over the recipe's per-method block.
    cfg = load_config("fashion-mnist", overrides=[("train.epochs", 7), ("methods.atcd.T", 3), ("optim.lr", 0.2),
                                                  ("eps", 0.2)])
    assert (cfg.train.epochs, cfg.train.budget, cfg.method_options.T, cfg.optim.lr, cfg.eps) == (7, None, 3, 0.2, 0.2)
    # Of train.epochs and train.budget, the later decides; the recipe's own epochs never override its budget.
    assert load_config("fashion-mnist", overrides=[("train.epochs", 7), ("train.budget", 4)]).train.epochs == 1
    assert load_config("fashion-mnist", overrides=[("train.method", "robust-overfitting")]).train.epochs == 10


def test_parse_override_reads_yaml_values():
    assert parse_override("optim.milestones=[10, 20]") == ("optim.milestones", [10, 20])
    assert parse_override("methods.atcd.mh=false") == ("methods.atcd.mh", False)
    assert parse_override("data.subset=null") == ("data.subset", None)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


@pytest.mark.parametrize("key,value,message", [
    ("eps", -0.1, "eps must be >= 0"),
    ("methods.atcd.K", 0, r"methods\.atcd: K must be >= 1"),
    ("methods.atcd.T", 0, r"methods\.atcd: T must be >= 1"),
    ("methods.atcd.init", "random", "init must be one of: carry, carry_delta, uniform"),
    ("methods.pgd.steps", 0, "steps must be >= 1"),
    ("train.method", "magic", "method must be one of: natural, pgd, free, fast, nfgsm, atcd, trades, yopo"),
    ("train.epochs", 0, "epochs must be > 0"),
    ("optim.schedule", "exp", "schedule must be one of"),
    ("train.nonsense", 1, r"train\.nonsense: unknown key; allowed: method, epochs"),
    ("methods.atcd.lambda", 2, r"methods\.atcd\.lambda: unknown key; allowed: T, K, lam"),
    ("methods.yopo2.m", 2, r"methods\.yopo2: unknown method"),
    ("methods.yopo.m", 0, "need m >= 1"),
    ("train.epochs", "ten", r"train\.epochs: expected int"),
    ("eval.attacks", ["pgd20", "bogus"], "unknown attack 'bogus'"),
    ("model", "vgg", "model must be one of: smallcnn"),
])
def test_bad_values_name_the_key_and_what_is_allowed(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config("fashion-mnist", overrides=[(key, value)])


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown dataset 'svhn'; allowed: fashion-mnist"):
        load_config("svhn")
