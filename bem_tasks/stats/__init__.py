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

from bem_tasks.stats import power
from bem_tasks.stats.analysis import RESULT_KEYS, MetricData, analyze
from bem_tasks.stats.bootstrap import BootstrapResult, paired_bca, paired_bootstrap
from bem_tasks.stats.multitest import bh_adjust
from bem_tasks.stats.plots import plot_forest

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
