"""GPU lease: pin a phase to concrete device indices of its device class.

Airflow pools bound how many GPU tasks of a class run at once, but not *which* GPUs each task
uses. On the worker, a lease takes one ``flock`` per device (``<lock_dir>/<class>/<index>.lock``)
and points ``CUDA_VISIBLE_DEVICES`` at the devices it holds. The kernel drops a flock when the
last descriptor of it closes, which includes the holder being killed, so a crashed task never
strands a GPU and a lock file left on disk means nothing by itself.

    with gpu_lease("h100_80gb", gpus=1, devices=2) as lease:
        train(...)                       # sees exactly one GPU as cuda:0
        manifest["gpu_lease"] = lease.to_manifest()

A lease is all-or-nothing: a task asking for two devices never sits on one while waiting for the
second, so two multi-GPU tasks cannot deadlock each other.

Caveats: enter the lease before CUDA is initialised in the process (CUDA reads
``CUDA_VISIBLE_DEVICES`` once). A child forked while the lease is held shares the lock and keeps
it until it exits too, which is what a DataLoader worker that touches the GPU needs. The lock
directory must be on a local file system shared by every worker process that sees the same GPUs
(flock over NFS is unreliable).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bem_tasks.io import utc_now

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "BEM_FLEET_LOCK_DIR"
DEFAULT_LOCK_DIR = "/tmp/bem_fleet_locks"  # noqa: S108 -- host-local on purpose (see docstring)
DEVICES_ENV_PREFIX = "BEM_FLEET_DEVICES_"
CUDA_ENV = "CUDA_VISIBLE_DEVICES"
# A still-busy wait is logged again after this long, so a long wait stays visible in the task log.
_RELOG_S = 60.0
# The class name becomes a directory name.
_CLASS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Lease:
    """What a phase got: record ``to_manifest()`` in the phase manifest."""

    device_class: str
    indices: list[int]
    waited_s: float
    lock_dir: str | None  # None for a CPU phase: nothing was locked
    # UTC wall clock, microseconds: with the manifest's created_at (written while the lease is
    # still held) it bounds when the devices were in use, comparable across hosts.
    acquired_at: str

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(i) for i in self.indices)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "device_class": self.device_class,
            "indices": list(self.indices),
            "cuda_visible_devices": self.cuda_visible_devices,
            "waited_s": round(self.waited_s, 3),
            "acquired_at": self.acquired_at,
            "host": socket.gethostname(),
        }


def lock_root(lock_dir: str | os.PathLike[str] | None = None) -> Path:
    """The lock directory: ``lock_dir`` if given, else ``BEM_FLEET_LOCK_DIR``, else the default."""
    return Path(
        lock_dir if lock_dir is not None else os.environ.get(LOCK_DIR_ENV, DEFAULT_LOCK_DIR)
    )


def devices_env_var(device_class: str) -> str:
    """``rtx4090_24gb`` -> ``BEM_FLEET_DEVICES_RTX4090_24GB``."""
    return DEVICES_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", device_class).upper()


def resolve_devices(
    device_class: str, devices: Sequence[int] | int | None = None, count: int | None = None
) -> list[int]:
    """Device indices of a class: explicit list, else ``BEM_FLEET_DEVICES_<CLASS>``, else 0..n-1.

    ``devices`` is the explicit index list, or (as an int) the same as ``count``: the class's
    ``devices`` in the architecture config.
    """
    if devices is not None and not isinstance(devices, int):
        return _check_indices(list(devices), f"devices={list(devices)!r}")
    env = devices_env_var(device_class)
    text = os.environ.get(env)
    if text is not None:
        return _parse_indices(text, f"environment variable {env}={text!r}")
    n = devices if devices is not None else count
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(
                f"device class {device_class!r}: device count {n!r} must be an int >= 0"
            )
        return list(range(n))
    raise ValueError(
        f"device class {device_class!r}: no device list; pass devices=[...] or the class's "
        f"device count, or set {env} (comma-separated indices such as '0,1')"
    )


def _parse_indices(text: str, source: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"{source}: expected comma-separated device indices such as '0,1'")
    return _check_indices([int(p) for p in parts], source)


def _check_indices(indices: list[Any], source: str) -> list[int]:
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{source}: device index {i!r} is not a non-negative integer")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{source}: device indices must be unique")
    return indices


@contextlib.contextmanager
def gpu_lease(
    device_class: str,
    gpus: int,
    *,
    devices: Sequence[int] | int | None = None,
    count: int | None = None,
    lock_dir: str | os.PathLike[str] | None = None,
    timeout_s: float = 3600.0,
    poll_s: float = 0.5,
    holder: str | None = None,
) -> Iterator[Lease]:
    """Hold ``gpus`` free devices of ``device_class`` and set CUDA_VISIBLE_DEVICES to them.

    ``devices``/``count``: the class's device indices or its device count (``resolve_devices``).
    ``gpus == 0`` locks nothing and hides every GPU (CUDA_VISIBLE_DEVICES=""). ``holder`` labels
    the lock (e.g. the task id) so that waiting tasks can log who holds a device. Raises
    ValueError at once when the class has fewer devices than asked, TimeoutError when the
    devices stay busy for ``timeout_s`` seconds.
    """
    if not _CLASS_RE.match(device_class):
        raise ValueError(
            f"device class {device_class!r}: expected letters, digits, '_', '.' or '-' "
            "(it names the lock directory)"
        )
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise ValueError(f"device class {device_class!r}: gpus={gpus!r} must be an int >= 0")
    if gpus == 0:
        with _cuda_visible_devices(""):
            yield Lease(device_class, [], 0.0, None, utc_now())
        return

    pool = resolve_devices(device_class, devices, count)
    if gpus > len(pool):
        raise ValueError(
            f"device class {device_class!r} has {len(pool)} device(s) {pool} "
            f"but the phase asks for gpus={gpus}"
        )
    if timeout_s < 0 or poll_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be >= 0 and poll_s={poll_s} > 0")
    base = lock_root(lock_dir)
    class_dir = base / device_class
    class_dir.mkdir(parents=True, exist_ok=True)

    start = time.monotonic()
    held = _acquire(class_dir, device_class, pool, gpus, timeout_s, poll_s)
    try:
        _write_holder(held, holder)
        lease = Lease(device_class, sorted(held), time.monotonic() - start, str(base), utc_now())
        _warn_if_cuda_initialized(lease)
        log.info(
            "gpu lease: class %r got device(s) %s (CUDA_VISIBLE_DEVICES=%s) after %.1f s",
            device_class,
            lease.indices,
            lease.cuda_visible_devices,
            lease.waited_s,
        )
        with _cuda_visible_devices(lease.cuda_visible_devices):
            yield lease
    finally:
        _release(held)


def _acquire(
    class_dir: Path, device_class: str, pool: list[int], gpus: int, timeout_s: float, poll_s: float
) -> dict[int, int]:
    """Lock ``gpus`` devices of ``pool`` (index -> fd), all or none, polling until the deadline."""
    deadline = time.monotonic() + timeout_s
    last_busy: list[int] | None = None
    last_log = 0.0
    while True:
        held: dict[int, int] = {}
        busy: list[int] = []
        for idx in pool:
            if len(held) == gpus:
                break
            fd = _try_lock(class_dir / f"{idx}.lock")
            if fd is None:
                busy.append(idx)
            else:
                held[idx] = fd
        if len(held) == gpus:
            return held
        _release(held)  # all-or-nothing: never sit on some devices while waiting for others

        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(
                f"gpu lease timed out after {timeout_s:g} s: device class {device_class!r} "
                f"needs {gpus} of device(s) {pool}, busy: {_describe(class_dir, busy)} "
                f"(lock dir {class_dir}). Check that the pool slots of {device_class!r} match "
                "its devices, or raise the timeout."
            )
        if busy != last_busy or now - last_log >= _RELOG_S:
            log.warning(
                "gpu lease: class %r wants %d of %d device(s) %s; busy: %s; "
                "waiting (up to %.0f s more)",
                device_class,
                gpus,
                len(pool),
                pool,
                _describe(class_dir, busy),
                deadline - now,
            )
            last_busy, last_log = busy, now
        time.sleep(min(poll_s, deadline - now))


def device_usage(
    device_class: str,
    devices: Sequence[int] | int | None = None,
    *,
    lock_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """``[{"index": 0, "state": "free"|"held", "holder": ...}, ...]`` for a class's devices.

    A device is probed by taking its lock without waiting and releasing it at once; a lease
    attempt that meets the probe just retries after its poll interval.
    """
    base = lock_root(lock_dir)
    class_dir = base / device_class
    out = []
    for idx in resolve_devices(device_class, devices):
        path = class_dir / f"{idx}.lock"
        fd = _try_lock(path) if class_dir.is_dir() else -1
        if fd is None:
            out.append({"index": idx, "state": "held", "holder": _describe(class_dir, [idx])})
            continue
        if fd >= 0:
            _release({idx: fd})
        out.append({"index": idx, "state": "free", "holder": None})
    return out


def _try_lock(path: Path) -> int | None:
    # O_CLOEXEC: a program the phase execs must not inherit (and so extend) the lease.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(held: dict[int, int]) -> None:
    # Lock files are never unlinked: a waiter may already have the old inode open, and unlinking
    # would let two processes lock two different files for the same device.
    for fd in held.values():
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    held.clear()


def _write_holder(held: dict[int, int], holder: str | None) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "holder": holder,
    }
    data = (json.dumps(info) + "\n").encode()
    for fd in held.values():
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _describe(class_dir: Path, busy: list[int]) -> str:
    """``0 (pid 12 on w1, task x), 1 (...)``: who holds each busy device, as far as it says."""
    out = []
    for idx in busy:
        try:
            info = json.loads((class_dir / f"{idx}.lock").read_text())
            who = f"pid {info['pid']} on {info['host']}"
            if info.get("holder"):
                who += f", {info['holder']}"
            out.append(f"{idx} ({who})")
        except (OSError, ValueError, KeyError, TypeError):
            out.append(str(idx))  # holder info is advisory; it may be mid-write
    return ", ".join(out) or "none"


@contextlib.contextmanager
def _cuda_visible_devices(value: str) -> Iterator[None]:
    old = os.environ.get(CUDA_ENV)
    os.environ[CUDA_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CUDA_ENV, None)
        else:
            os.environ[CUDA_ENV] = old


def _warn_if_cuda_initialized(lease: Lease) -> None:
    torch = sys.modules.get("torch")  # never import torch here: a CPU-only worker may lack CUDA
    if torch is not None and torch.cuda.is_initialized():
        log.warning(
            "gpu lease: CUDA was initialised in this process before the lease, so "
            "CUDA_VISIBLE_DEVICES=%s has no effect here; this phase may use other devices "
            "than %s of class %r",
            lease.cuda_visible_devices,
            lease.indices,
            lease.device_class,
        )


# ----------------------------------------------------------------------------- checking a record


@dataclass(frozen=True)
class Hold:
    """One phase's hold of one device, as its manifest records it.

    ``[start, end]`` is ``[lease acquired_at, manifest created_at]``: the manifest is written
    while the lease is still held, so the span lies within the time the device was held.
    """

    device_class: str
    index: int
    start: datetime
    end: datetime
    holder: str


def manifest_holds(manifest: dict[str, Any], holder: str) -> list[Hold]:
    """The holds a phase manifest records, one per leased device (none for a CPU phase)."""
    lease = manifest["lease"]
    start = datetime.fromisoformat(lease["acquired_at"])
    end = datetime.fromisoformat(manifest["created_at"])
    return [Hold(lease["device_class"], i, start, end, holder) for i in lease["indices"]]


def _overlapping(holds: Sequence[Hold], same_device: bool) -> list[tuple[Hold, Hold]]:
    out = []
    for i, a in enumerate(holds):
        for b in holds[i + 1 :]:
            if a.device_class != b.device_class or a.holder == b.holder:
                continue
            # Touching spans (one ends as the next starts) are a hand-over, not an overlap.
            if (a.index == b.index) == same_device and a.start < b.end and b.start < a.end:
                out.append((a, b))
    return out


def shared_devices(holds: Sequence[Hold]) -> list[tuple[Hold, Hold]]:
    """Pairs of holders that held the same device at the same time: each pair is a lease broken.

    The exclusivity check of a run's record; empty means no device was ever shared.
    """
    return _overlapping(holds, same_device=True)


def concurrent_holds(holds: Sequence[Hold]) -> list[tuple[Hold, Hold]]:
    """Pairs of holders of one class that held different devices at the same time.

    Without such a pair the exclusivity check had nothing to catch: every device was taken one
    phase at a time, so a lease that hands out index 0 to everyone would pass it too.
    """
    return _overlapping(holds, same_device=False)
