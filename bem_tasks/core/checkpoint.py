"""Checkpoints: safetensors weights + optimizer state + RNG state + step, sha256 manifest.

Layout of one checkpoint (published by renaming a finished temp directory, so a reader never
sees half of one)::

    <dir>/step-00000010/model.safetensors      model weights (all, or trainable only)
                        optimizer.safetensors  optimizer tensors
                        rng.safetensors        torch (+CUDA) and numpy RNG tensors
                        state.json             step, extra, optimizer/RNG non-tensor state
                        manifest.json          sha256 + size of every file above
    <dir>/latest.json                          pointer to the newest checkpoint (atomic)

No pickle anywhere: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import nn

from bem_tasks.io import atomic_write_json, file_digests, remove_tree, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"
POINTER = "latest.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    pass


class CheckpointCorruptError(CheckpointError):
    pass


class WeightsMismatch(CheckpointError, ValueError):
    """Weights that do not fit the model (another config's checkpoint): bad input, so also a
    ValueError (the CLI answers it with exit code 2)."""


@dataclass
class LoadedCheckpoint:
    step: int
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- file system helpers
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp directory next to ``final``; on success it replaces ``final`` by rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
            os.rmdir(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if os.name == "posix":
            _fsync_path(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(directory: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    files = file_digests(directory, skip=lambda p: p.name == MANIFEST)
    manifest = {"format": FORMAT_VERSION, "files": files, **(meta or {})}
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def verify_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file listed in the manifest; raise CheckpointCorruptError naming the file."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise CheckpointCorruptError(f"{mpath}: manifest missing (incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointCorruptError(f"{mpath}: unreadable manifest ({exc})") from exc
    for name, info in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointCorruptError(f"{path}: listed in {mpath} but missing")
        digest = sha256_file(path)
        if digest != info.get("sha256"):
            raise CheckpointCorruptError(
                f"{path}: sha256 mismatch (manifest {info.get('sha256')}, file {digest})"
            )
    return dict(manifest)


# ---------------------------------------------------------------------- weights
def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _write_weights(path: Path, model: nn.Module, trainable_only: bool) -> None:
    if trainable_only:
        save_file(_trainable_state(model), str(path), metadata={"format": "bem-fleet"})
    else:
        # save_model de-duplicates tied tensors (e.g. GPT-2 wte / lm_head).
        st_save_model(model, str(path), metadata={"format": "bem-fleet"})


def _read_weights(path: Path, model: nn.Module, trainable_only: bool) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    # Shapes first, from the file's header: torch's own size-mismatch error names neither the
    # file nor what to do about it.
    wanted = model.state_dict()
    with safe_open(str(path), framework="pt") as fh:
        shapes = {
            k: list(fh.get_slice(k).get_shape())
            for k in fh.keys()  # noqa: SIM118 - safe_open is not a mapping
            if k in wanted
        }
    wrong = [
        f"{k}: checkpoint {shape}, model {list(wanted[k].shape)}"
        for k, shape in shapes.items()
        if shape != list(wanted[k].shape)
    ]
    if wrong:
        raise WeightsMismatch(
            f"{path}: weights do not fit {type(model).__name__} (a checkpoint of another config?): "
            + "; ".join(wrong[:4])
            + (f"; and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        )
    if not trainable_only:
        missing, unexpected = st_load_model(model, str(path), strict=False)
    else:
        tensors = load_file(str(path))
        expected = set(_trainable_state(model))
        missing = sorted(expected - set(tensors))
        unexpected = sorted(set(tensors) - expected)
        if not missing and not unexpected:
            model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise WeightsMismatch(
            f"{path}: weights do not fit {type(model).__name__}: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )


def save_weights(
    path: str | os.PathLike[str], model: nn.Module, *, trainable_only: bool = False
) -> Path:
    """Write model weights (all, or only trainable parameters) atomically as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _write_weights(Path(tmp), model, trainable_only)
        _fsync_path(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_weights(
    path: str | os.PathLike[str], model: nn.Module, *, trainable_only: bool = False
) -> None:
    """Load weights written by ``save_weights``; every key must fit the model exactly."""
    _read_weights(Path(path), model, trainable_only)


# ---------------------------------------------------------------------- optimizer / RNG
_JSON_SCALARS = (int, float, bool, str, type(None))


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"cannot checkpoint {where}: {type(value).__name__} is neither tensor nor JSON")


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        entry: dict[str, Any] = {}
        for key, val in pstate.items():
            if isinstance(val, torch.Tensor):
                name = f"state.{pid}.{key}"
                tensors[name] = val.detach().cpu().contiguous()
                entry[key] = {"__tensor__": name}
            else:
                entry[key] = _jsonable(val, f"optimizer.state.{pid}.{key}")
        state[str(pid)] = entry
    groups = _jsonable(sd["param_groups"], "optimizer.param_groups")
    return tensors, {"state": state, "param_groups": groups}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {
            k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v
            for k, v in entry.items()
        }
    groups = meta["param_groups"]
    # JSON turns tuples (Adam's betas) into lists; give them back the optimizer's own types.
    for saved, current in zip(groups, optimizer.param_groups, strict=False):
        for key, val in current.items():
            if isinstance(val, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached": cached},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    npm = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((npm["name"], keys, npm["pos"], npm["has_gauss"], npm["cached"]))
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


# ---------------------------------------------------------------------- manager
class CheckpointManager:
    """Numbered checkpoints under ``directory``; keeps the newest ``keep``.

    ``load_latest`` verifies hashes and falls back to the newest checkpoint that verifies,
    logging (and recording in ``refusals``) every refused one. It scans the step directories
    rather than trusting ``latest.json`` alone, so a crash between publishing a checkpoint and
    updating the pointer loses nothing; the pointer is for readers such as the dashboard.
    """

    def __init__(
        self, directory: str | os.PathLike[str], keep: int = 3, *, trainable_only: bool = False
    ) -> None:
        if keep < 1:
            raise ValueError(f"CheckpointManager keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.trainable_only = trainable_only
        self.refusals: list[str] = []

    def step_dir(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every published checkpoint, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest_pointer(self) -> dict[str, Any] | None:
        path = self.directory / POINTER
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("%s: unreadable pointer, ignoring it", path)
            return None
        return data if isinstance(data, dict) else None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        final = self.step_dir(step)
        rng_tensors, rng_meta = rng_state()
        state: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "step": step,
            "extra": _jsonable(extra or {}, "extra"),
            "rng": rng_meta,
            "trainable_only": self.trainable_only,
            "optimizer": None,
        }
        with atomic_directory(final) as tmp:
            _write_weights(tmp / "model.safetensors", model, self.trainable_only)
            if optimizer is not None:
                opt_tensors, state["optimizer"] = optimizer_state(optimizer)
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            atomic_write_json(tmp / STATE, state)
            write_manifest(tmp, {"step": step})
        atomic_write_json(self.directory / POINTER, {"step": step, "path": final.name})
        self._prune()
        return final

    def _prune(self) -> None:
        for _, path in self.checkpoints()[: -self.keep]:
            remove_tree(path)  # a half-deleted checkpoint would be visible to readers
        # Left by a crash: a save's temp folder, a prune's renamed-away step, or the step a
        # re-save of the same step moved aside (atomic_directory) before deleting it.
        for pattern in (".tmp-step-*", ".trash-step-*", ".old-step-*"):
            for p in self.directory.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)

    def load(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        restore_rng: bool = True,
    ) -> LoadedCheckpoint:
        """Verify and load one checkpoint directory."""
        path = Path(path)
        verify_checkpoint(path)
        return self._load_verified(path, model, optimizer, restore_rng=restore_rng)

    def _load_verified(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        restore_rng: bool,
    ) -> LoadedCheckpoint:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        _read_weights(path / "model.safetensors", model, bool(state.get("trainable_only")))
        if optimizer is not None:
            if state.get("optimizer") is None:
                raise CheckpointError(f"{path / STATE}: no optimizer state saved")
            opt_tensors = load_file(str(path / "optimizer.safetensors"))
            load_optimizer_state(optimizer, opt_tensors, state["optimizer"])
        if restore_rng:
            restore_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
        return LoadedCheckpoint(step=int(state["step"]), path=path, extra=state.get("extra", {}))

    def resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        restore_rng: bool = True,
    ) -> LoadedCheckpoint | None:
        """Load the newest checkpoint that verifies; None when there is none at all."""
        candidates = self.checkpoints()[::-1]
        if not candidates:
            return None
        for step, path in candidates:
            try:
                verify_checkpoint(path)
            except CheckpointCorruptError as exc:
                older = [p.name for s, p in candidates if s < step]
                msg = f"refused checkpoint {path.name}: {exc}; falling back to " + (
                    older[0] if older else "nothing"
                )
                log.warning(msg)
                self.refusals.append(msg)
                continue
            return self._load_verified(path, model, optimizer, restore_rng=restore_rng)
        raise CheckpointCorruptError(
            f"no checkpoint under {self.directory} verifies: " + "; ".join(self.refusals[-3:])
        )

    def load_latest(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        restore_rng: bool = True,
    ) -> int | None:
        loaded = self.resume(model, optimizer, restore_rng=restore_rng)
        return None if loaded is None else loaded.step
