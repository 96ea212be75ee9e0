"""Paired, example-level statistics for BEM Fleet: BCa bootstrap CIs, p-values, BH-FDR, power.

Public API:

* :func:`paired_bca` — BCa CI of the mean paired difference (1-D diffs, or examples x seeds).
* :func:`paired_bootstrap` — CI, p-value and standard error for one paired comparison (mean or
  quantile, absolute or relative change).
* :func:`analyze` — every metric of a run at once: CIs, p-values, BH within families, effect sizes.
* :func:`bh_adjust` — Benjamini-Hochberg adjusted p-values (statsmodels), monotone, input order.
* :mod:`bem_tasks.stats.power` — ``required_n``, ``achieved_power``, ``n_for_margin``.
* :func:`plot_forest` — forest plot PNG of ``analyze`` results.

No Airflow here; matplotlib and statsmodels are imported only when used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Attributes load on first use: the gates config (read when a DAG file is parsed) needs only
# `bem_tasks.stats.statistic`, not numpy and scipy.
_WHERE = {
    "RESULT_KEYS": "analysis",
    "MetricData": "analysis",
    "analyze": "analysis",
    "BootstrapResult": "bootstrap",
    "paired_bca": "bootstrap",
    "paired_bootstrap": "bootstrap",
    "bh_adjust": "multitest",
    "plot_forest": "plots",
}


def __getattr__(name: str) -> Any:
    if name == "power":
        return import_module("bem_tasks.stats.power")
    if name in _WHERE:
        return getattr(import_module(f"bem_tasks.stats.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'bem_tasks.stats' has no attribute {name!r}")


__all__ = [
    "RESULT_KEYS",
    "BootstrapResult",
    "MetricData",
    "analyze",
    "bh_adjust",
    "paired_bca",
    "paired_bootstrap",
    "plot_forest",
    "power",
]
