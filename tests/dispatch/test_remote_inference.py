"""An inference StepContext (the generation engine's) keeps nothing on the expert servers, even with grad enabled
and a training step of the same number in flight: its activations can never meet a training step's."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from moe_runtime.model.moe_layer import StepContext
from tests.dispatch.test_remote import CONTIGUOUS, LAYER, D, build, deploy, remote_layer, servers  # noqa: F401


def test_inference_context_saves_nothing_and_leaves_training_entries_alone(servers):  # noqa: F811
    procs, _ = servers
    local, experts = build(CONTIGUOUS, seed=3)
    deploy(servers, experts, CONTIGUOUS)
    remote = remote_layer(local, servers, CONTIGUOUS)
    x_train = torch.randn(1, 16, D, requires_grad=True)
    y_train = remote(x_train, StepContext(7, 0))[0]  # a training forward: saved under (7, 0, layer, 0)
    saved = [p.call("saved_keys") for p in procs]
    assert any(saved)
    x = torch.randn(1, 16, D, requires_grad=True)
    y = remote(x, StepContext.for_inference(7))[0]  # same step number, grad enabled: still nothing kept
    assert_close(y, local(x)[0])
    assert [p.call("saved_keys") for p in procs] == saved
    with pytest.raises(RuntimeError, match="without grad"):
        y.sum().backward()
    y_train.sum().backward()  # the training step's backward still finds its own activations
    assert all(p.call("saved_keys") == [] for p in procs)
