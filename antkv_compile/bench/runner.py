"""The benchmark object: its state (core), points, runs and report, one class each."""
from __future__ import annotations

from .core import BenchCore
from .points import PointsMixin
from .report import ReportMixin
from .runs import RunsMixin


class Bench(ReportMixin, RunsMixin, PointsMixin, BenchCore):
    """One benchmark run (``antkv-compile bench``): see the package docstring."""
