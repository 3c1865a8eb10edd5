"""Restoring a DeepSpeed checkpoint reads tensors, never code: a file planted in the run's storage cannot run."""

from __future__ import annotations

import pickle

import pytest
import torch
from engines import deepspeed_engine
from ray.train import Checkpoint

from rayalign.config import TrainConfig
from rayalign.train.checkpoint import DEEPSPEED_TAG, restore


class Planted:
    """What an attacker with write access to the storage would put in a checkpoint: unpickling runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_restore_loads_weights_and_refuses_pickled_code(tiny_model_dir, process_group, tmp_path, zero_stage):
    engine = deepspeed_engine(tiny_model_dir, TrainConfig(zero_stage=zero_stage), torch.device("cpu"))
    saved = tmp_path / "saved"
    engine.save_checkpoint(str(saved), tag=DEEPSPEED_TAG)
    expected = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)

    # DeepSpeed's own checkpoint comes back whole through the weights-only loader.
    restore(engine, Checkpoint.from_directory(str(saved)), tmp_path / "metrics.jsonl")
    if zero_stage < 3:
        for name, p in engine.module.named_parameters():
            torch.testing.assert_close(p.detach(), expected[name], msg=name)
    assert engine.checkpoint_engine.load.__self__ is engine.checkpoint_engine  # its own loader is back

    # The same checkpoint with an object that runs code when unpickled: refused, and the code never ran.
    (optim_states,) = (saved / DEEPSPEED_TAG).glob("*optim_states.pt")
    state = torch.load(optim_states, weights_only=False)  # our own file: trusted here
    state["planted"] = Planted(tmp_path / "ran")
    torch.save(state, optim_states)
    with pytest.raises(pickle.UnpicklingError, match=r"optim_states.pt: not restored, it holds io.open"):
        restore(engine, Checkpoint.from_directory(str(saved)), tmp_path / "metrics.jsonl")
    assert not (tmp_path / "ran").exists()
