"""Names of the statistics a comparison can use; light (no numpy) so config loading stays fast."""

from __future__ import annotations

import re

# Relative rounding tolerance: values closer than this times the data's magnitude are equal (a
# tie in the sign test, a degenerate bootstrap, a CI bound on a gate's threshold). Float64 sums of
# a few thousand values err by about 1e-13 relative; real effects are far larger than 1e-9.
TIE_RTOL = 1e-9


def parse_statistic(name: str) -> float | None:
    """``"mean"`` -> None; ``"median"`` -> 0.5; ``"p95"`` -> 0.95 (any percentile in (0, 100))."""
    if name == "mean":
        return None
    if name == "median":
        return 0.5
    m = re.fullmatch(r"p(\d{1,2}(?:\.\d+)?)", name)
    if m and 0.0 < float(m.group(1)) < 100.0:
        return float(m.group(1)) / 100.0
    raise ValueError(
        f"statistic must be 'mean', 'median' or a percentile such as 'p95', got {name!r}"
    )
