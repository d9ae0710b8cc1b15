"""askexpert/callbacks/rng.py: the global random states go into a checkpoint as plain data and come back exactly,
so a resumed `fit` draws what the uninterrupted run drew (the end-to-end check is in tests/test_run_safety.py)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from askexpert.callbacks.rng import STATE_VERSION, RandomStateCheckpoint, collect_states, restore_states


def draws() -> tuple:
    """One draw from each generator a training step uses; the Gaussians use the cached second value of a pair."""
    return (
        random.random(),
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
        torch.rand(4).tolist(),
        torch.randperm(10).tolist(),
    )


def through_a_checkpoint(states: dict) -> dict:
    """`states` saved and read back the way a checkpoint is (`torch.load(weights_only=True)`)."""
    buffer = io.BytesIO()
    torch.save({"callbacks": {"RandomStateCheckpoint": states}}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["callbacks"]["RandomStateCheckpoint"]


@pytest.fixture(autouse=True)
def _leave_the_generators_as_they_were():
    saved = collect_states()
    yield
    restore_states(saved)


def test_restoring_the_states_repeats_every_generator() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    # half a Gaussian pair is now cached in python's and numpy's generators: the states must carry it
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    states = collect_states()
    first = draws()
    assert draws() != first  # the generators moved on
    restore_states(through_a_checkpoint(states))
    assert draws() == first


def test_the_states_are_plain_data() -> None:
    states = collect_states()
    assert states["version"] == STATE_VERSION
    assert isinstance(states["torch"], torch.Tensor) and isinstance(states["python"]["state"], torch.Tensor)
    assert isinstance(states["numpy"]["keys"], torch.Tensor) and len(states["numpy"]["keys"]) == 624
    if not torch.cuda.is_initialized():  # asking for CUDA states would create a CUDA context
        assert "cuda" not in states
    restored = through_a_checkpoint(states)  # would raise if anything but tensors and plain values were in it
    assert torch.equal(restored["torch"], states["torch"])


def test_the_callback_restores_only_when_fit_resumes() -> None:
    callback = RandomStateCheckpoint()
    torch.manual_seed(1)
    saved = callback.state_dict()
    expected = torch.rand(5)

    for stage in ("validate", "test", "predict"):  # Lightning restores callback states for these too
        callback.setup(None, None, stage)
        torch.manual_seed(2)
        callback.load_state_dict(saved)
        assert not torch.equal(torch.rand(5), expected), stage

    callback.setup(None, None, "fit")
    torch.manual_seed(2)
    callback.load_state_dict({**saved, "version": STATE_VERSION + 1})  # a layout this code does not know
    assert not torch.equal(torch.rand(5), expected)
    callback.load_state_dict(saved)
    assert torch.equal(torch.rand(5), expected)


def test_a_resume_before_fit_setup_leaves_the_generators_alone() -> None:
    callback = RandomStateCheckpoint()
    torch.manual_seed(1)
    saved = callback.state_dict()
    expected = torch.rand(5)
    torch.manual_seed(1)
    torch.rand(1)
    callback.load_state_dict(saved)
    assert not torch.equal(torch.rand(5), expected)
