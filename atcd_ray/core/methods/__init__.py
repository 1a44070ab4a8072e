"""Training methods, one file each, by the names the command line uses."""
from .atcd import ATCD
from .base import Method
from .fast import FastFGSM
from .free import Free
from .natural import Natural
from .nfgsm import NFGSM
from .pgd import PGDAT
from .trades import TRADES
from .yopo import TRADESYOPO, YOPO

METHODS: dict[str, type[Method]] = {
    "natural": Natural, "pgd": PGDAT, "free": Free, "fast": FastFGSM, "nfgsm": NFGSM, "atcd": ATCD,
    "trades": TRADES, "yopo": YOPO, "trades-yopo": TRADESYOPO,
    # Rice et al. 2020: PGD-AT on a long piecewise schedule, keeping the checkpoint with the best
    # validation robust accuracy; the recipes' per_method blocks set both.
    "robust-overfitting": PGDAT,
}

__all__ = ["METHODS", "Method", "ATCD", "FastFGSM", "Free", "Natural", "NFGSM", "PGDAT", "TRADES", "TRADESYOPO", "YOPO"]
