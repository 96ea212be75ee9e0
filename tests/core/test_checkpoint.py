"""Checkpoints: exact resume, hash verification with fallback, keep-N, latest pointer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bem_tasks.core import (
    CheckpointCorruptError,
    CheckpointManager,
    attach_bem,
    bem_parameters,
    build_model,
    load_weights,
    save_weights,
    verify_checkpoint,
)


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A tiny GPT-2 with dropout and Gumbel routing, so the RNG state matters for training."""
    model = build_model("gpt2", d_model=32, n_layers=2, n_heads=4, max_positions=64, dropout=0.1)
    attach_bem(model, num_experts=2, rank=4, chunk_size=8, routing="gumbel", seed=0)
    model.train()
    opt = torch.optim.AdamW(bem_parameters(model), lr=1e-2, weight_decay=0.01)
    return model, opt


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        # Data drawn from all three RNGs, as a real loader might.
        length = 16 + int(np.random.randint(0, 8))
        offset = random.randrange(0, 4)
        ids = (torch.randint(0, 250, (2, length)) + offset) % 260
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _seed(s: int) -> None:
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    _seed(0)
    model_a, opt_a = _fresh()
    _train(model_a, opt_a, 20)

    _seed(0)
    model_b, opt_b = _fresh()
    _train(model_b, opt_b, 10)
    CheckpointManager(tmp_path, keep=2).save(10, model_b, opt_b, extra={"epoch": 1})
    del model_b, opt_b
    # "Kill": fresh objects and a scrambled RNG; everything must come from the checkpoint.
    _seed(12345)
    model_c, opt_c = _fresh()
    manager = CheckpointManager(tmp_path, keep=2)
    loaded = manager.resume(model_c, opt_c)
    assert loaded is not None and loaded.step == 10 and loaded.extra == {"epoch": 1}
    _train(model_c, opt_c, 10)

    state_a, state_c = model_a.state_dict(), model_c.state_dict()
    assert state_a.keys() == state_c.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_c[name]), name


def test_files_hashes_and_no_pickle(tmp_path: Path) -> None:
    model, opt = _fresh()
    _train(model, opt, 2)
    path = CheckpointManager(tmp_path).save(2, model, opt)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]
    manifest = verify_checkpoint(path)
    assert manifest["step"] == 2 and set(manifest["files"]) == set(names) - {"manifest.json"}
    state = json.loads((path / "state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]


def test_corrupt_newest_falls_back_to_previous(tmp_path: Path) -> None:
    model, opt = _fresh()
    manager = CheckpointManager(tmp_path, keep=3)
    _train(model, opt, 1)
    manager.save(1, model, opt)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, 1)
    newest = manager.save(2, model, opt)
    raw = bytearray((newest / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(raw))

    with pytest.raises(CheckpointCorruptError, match=r"step-00000002/model.safetensors: sha256"):
        verify_checkpoint(newest)
    fresh, fresh_opt = _fresh()
    assert manager.load_latest(fresh, fresh_opt) == 1
    assert len(manager.refusals) == 1
    assert "model.safetensors" in manager.refusals[0]
    assert "falling back to step-00000001" in manager.refusals[0]
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, good[k]), k

    (tmp_path / "step-00000001" / "state.json").write_text("{}")
    with pytest.raises(CheckpointCorruptError, match="no checkpoint .* verifies"):
        manager.load_latest(fresh, fresh_opt)


def test_keep_n_and_latest_pointer(tmp_path: Path) -> None:
    model, opt = _fresh()
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.load_latest(model, opt) is None
    (tmp_path / ".tmp-step-00000099-leftover").mkdir()  # a save killed mid-way
    (tmp_path / ".old-step-00000015-leftover").mkdir()  # a re-save killed before its cleanup
    for step in (5, 10, 15):
        path = manager.save(step, model, opt)
        pointer = json.loads((tmp_path / "latest.json").read_text())
        assert pointer == {"step": step, "path": path.name}
    assert [s for s, _ in manager.checkpoints()] == [10, 15]
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))
    # Re-saving an existing step replaces it atomically.
    manager.save(15, model, opt, extra={"again": True})
    fresh, fresh_opt = _fresh()
    loaded = manager.resume(fresh, fresh_opt)
    assert loaded is not None and loaded.step == 15 and loaded.extra == {"again": True}


def test_a_crash_while_pruning_leaves_no_half_deleted_checkpoint_in_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruning deletes a checkpoint by renaming it out of view first (found by the kill trials:
    a SIGKILL inside the old rmtree left a step folder whose manifest listed deleted files)."""
    import bem_tasks.io

    model, opt = _fresh()
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(5, model, opt)
    manager.save(10, model, opt)

    def crash(path: object, ignore_errors: bool = False) -> None:
        raise KeyboardInterrupt  # the process dies between the rename and the delete

    with monkeypatch.context() as m:
        m.setattr(bem_tasks.io.shutil, "rmtree", crash)
        with pytest.raises(KeyboardInterrupt):
            manager.save(15, model, opt)
    assert [s for s, _ in manager.checkpoints()] == [10, 15]
    for _, path in manager.checkpoints():
        verify_checkpoint(path)
    assert [p.name.rsplit("-", 1)[0] for p in tmp_path.glob(".trash-*")] == [".trash-step-00000005"]
    manager.save(20, model, opt)  # the next prune clears what the crash left
    assert not list(tmp_path.glob(".*-step-*"))


def test_a_foreign_checkpoint_folder_is_never_adopted_after_a_crash_in_its_removal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint folder of another config is removed by a rename first: a crash while
    deleting it cannot leave its steps without their fingerprint stamp under the folder's name,
    where the next run would resume them as its own."""
    import bem_tasks.io
    from bem_tasks.missions.common import fingerprinted_checkpoints

    model, opt = _fresh()
    folder = tmp_path / "ckpt" / "base"
    fingerprinted_checkpoints(folder, 2, "config-a", trainable_only=False).save(5, model, opt)

    def crash(path: object, ignore_errors: bool = False) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(bem_tasks.io.shutil, "rmtree", crash)
        with pytest.raises(KeyboardInterrupt):
            fingerprinted_checkpoints(folder, 2, "config-b", trainable_only=False)
    assert len(list(folder.parent.glob(".trash-base-*"))) == 1  # what the crash left
    manager = fingerprinted_checkpoints(folder, 2, "config-b", trainable_only=False)
    assert manager.checkpoints() == []
    assert json.loads((folder / "fingerprint.json").read_text()) == {"fingerprint": "config-b"}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["base"]  # and the next open cleared


def test_save_load_weights(tmp_path: Path) -> None:
    model, _ = _fresh()
    with torch.no_grad():
        for p in bem_parameters(model):
            p.add_(0.5)
    save_weights(tmp_path / "full.safetensors", model)
    save_weights(tmp_path / "bem.safetensors", model, trainable_only=True)
    other, _ = _fresh()
    load_weights(tmp_path / "bem.safetensors", other, trainable_only=True)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    other2, _ = _fresh()
    load_weights(tmp_path / "full.safetensors", other2)
    assert torch.equal(other2.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])
    plain = build_model("gpt2", d_model=32, n_layers=2, n_heads=4, max_positions=64)
    with pytest.raises(RuntimeError, match="bem.safetensors: weights do not fit"):
        load_weights(tmp_path / "bem.safetensors", plain, trainable_only=True)
