"""Training methods, one file each, by the names the command line uses."""
from .atcd import ATCD
from .base import Method
from .fast import FastFGSM
from .free import Free
from .natural import Natural
from .pgd import PGDAT

METHODS: dict[str, type[Method]] = {"natural": Natural, "pgd": PGDAT, "free": Free, "fast": FastFGSM, "atcd": ATCD}

__all__ = ["METHODS", "Method", "ATCD", "FastFGSM", "Free", "Natural", "PGDAT"]
