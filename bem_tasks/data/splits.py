"""Hash-based train/dev/test regions: held-out data never overlaps training, by construction.

Every item has a canonical key (e.g. the prompt text, or the needle facts). The key's SHA-256,
salted with the suite name, puts it in a fixed *region* of the unit interval (default 80% train,
10% dev, 10% test). The region depends only on (salt, key, fractions), never on the seed or the
requested sizes, so a key that is test for one seed or size is test for every seed and size and
can never be drawn into any training split. Generators sample candidates from a seeded RNG and
keep those that fall in the region they still need; ``check_disjoint`` re-checks the result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "dev": 0.1, "test": 0.1}


def hash_unit(key: str, *, salt: str) -> float:
    """A uniform number in [0, 1) that is a pure function of (salt, key)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def stable_id(prefix: str, key: str, *, salt: str) -> str:
    """A short id derived from the canonical key, so ids are stable across runs and seeds."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).hexdigest()
    return f"{prefix}-{digest[:12]}"


def _check_fractions(fractions: Mapping[str, float]) -> None:
    if not fractions or any(f <= 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be positive, got {dict(fractions)}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {dict(fractions)} (sum {total})")


def region_of(key: str, *, salt: str, fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> str:
    """The split region that ``key`` belongs to (cumulative fractions, in mapping order)."""
    _check_fractions(fractions)
    u = hash_unit(key, salt=salt)
    acc = 0.0
    names = list(fractions)
    for name in names:
        acc += fractions[name]
        if u < acc:
            return name
    return names[-1]


def fill_splits(
    sample: Callable[[], T],
    key: Callable[[T], str],
    sizes: Mapping[str, int],
    *,
    salt: str,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seen: set[str] | None = None,
    max_tries: int | None = None,
    region_key: Callable[[T], str] | None = None,
) -> dict[str, list[T]]:
    """Draw candidates from ``sample`` until each split has ``sizes[split]`` unique items.

    A candidate goes to the split its key's region names, or is dropped if that split is full or
    the key was already used (``seen`` is updated, so callers can share it across calls).
    ``region_key`` (default ``key``) decides the region: items that share what it returns
    (e.g. the secret a prompt is about) always land in the same split.
    Raises ``ValueError`` when the item space is too small to fill the request.
    """
    unknown = sorted(set(sizes) - set(fractions))
    if unknown:
        raise ValueError(f"sizes name splits {unknown} that have no fraction in {dict(fractions)}")
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {dict(sizes)}")
    seen = set() if seen is None else seen
    out: dict[str, list[T]] = {name: [] for name in sizes}
    need = sum(sizes.values())
    limit = max_tries if max_tries is not None else 200 * need + 10_000
    tries = 0
    while need > 0:
        if tries >= limit:
            got = {k: len(v) for k, v in out.items()}
            raise ValueError(
                f"could not fill splits {dict(sizes)} after {tries} draws (got {got}); "
                "the item space is too small: raise its size (keys, values, facts) or ask for less"
            )
        tries += 1
        item = sample()
        k = key(item)
        if k in seen:
            continue
        region = region_of(region_key(item) if region_key else k, salt=salt, fractions=fractions)
        if region in out and len(out[region]) < sizes[region]:
            seen.add(k)
            out[region].append(item)
            need -= 1
    return out


def draw_in_region(
    sample: Callable[[], T],
    key: Callable[[T], str],
    region: str,
    *,
    salt: str,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seen: set[str],
    max_tries: int = 100_000,
) -> T:
    """Draw one unused item whose key lies in ``region`` (``seen`` is updated)."""
    if region not in fractions:
        raise ValueError(f"unknown region {region!r}; expected one of {list(fractions)}")
    for _ in range(max_tries):
        item = sample()
        k = key(item)
        if k not in seen and region_of(k, salt=salt, fractions=fractions) == region:
            seen.add(k)
            return item
    raise ValueError(f"no unused item in region {region!r} after {max_tries} draws")


def _default_key(item: Any) -> str:
    if isinstance(item, str):
        return item
    k = getattr(item, "key", None)
    if not isinstance(k, str):
        raise TypeError(f"cannot take a split key from {type(item).__name__}; pass key=")
    return k


def find_overlaps(
    splits: Mapping[str, Iterable[Any]], *, key: Callable[[Any], str] = _default_key
) -> list[tuple[str, str, str]]:
    """Every item whose key an earlier item already has, as ``(key, first, again)`` where
    ``first`` and ``again`` are ``<split>:<position>`` (1-based: a file's line number when the
    splits are JSONL files named by path). Items may be key strings or rows with a ``key``."""
    owner: dict[str, str] = {}
    found: list[tuple[str, str, str]] = []
    for name, items in splits.items():
        for pos, item in enumerate(items, start=1):
            k = key(item)
            where = f"{name}:{pos}"
            if k in owner:
                found.append((k, owner[k], where))
            else:
                owner[k] = where
    return found


def check_disjoint(
    splits: Mapping[str, Iterable[Any]], *, key: Callable[[Any], str] = _default_key
) -> None:
    """Raise ``ValueError`` if any key occurs in two splits (or twice in one split), naming
    both places (``find_overlaps``). Suite A/B rows and Suite C's benign rows key by their
    content key, so for them this checks disjointness by content, not by text; other rows key
    by their own ``key``."""
    found = find_overlaps(splits, key=key)
    if found:
        shown = "; ".join(f"{a} and {b} share {k!r}" for k, a, b in found[:5])
        more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
        raise ValueError(f"splits overlap: {shown}{more}")


def split_sizes(n_train: int, n_dev: int, n_test: int) -> dict[str, int]:
    """``{"train": .., "dev": .., "test": ..}``; every written split needs at least one row."""
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    bad = {k: v for k, v in sizes.items() if v < 1}
    if bad:
        raise ValueError(f"every written split needs at least 1 row, got {bad}")
    return sizes
