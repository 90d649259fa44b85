"""A party builds its AdamW at its first step, not at its start, and no party ever imports torch._dynamo (what a
torch.optim optimizer does at construction, step and zero_grad: ~1 CPU-s a process; moe_runtime/adamw.py); a trained
one has the same state as before (tests/gpu/test_gpu_checkpoint.py checks steps, saves and loads across devices on
the CPU too). Each case runs in a fresh interpreter: torch._dynamo, once imported, stays in sys.modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EXPERT = """
import sys
from tests.gpu.test_gpu_checkpoint import _config, _shards, _step
from moe_runtime.runtime.expert_actor import ExpertActor
cfg = _config()
a = ExpertActor(cfg, 0, "tok", device="cpu")
a.load_shards(_shards(cfg), 0)
before = a.state()
serving = "torch._dynamo" in sys.modules
_step(a, 1, 0)
after = a.state()
a.shutdown()
print(serving, "torch._dynamo" in sys.modules,
      any("w1.exp_avg" in d for d in before.values()), all("w1.exp_avg" in d for d in after.values()))
"""

def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_an_expert_actor_builds_adamw_at_its_first_step_without_dynamo():
    assert _run(EXPERT) == ["False", "False", "False", "True"]


def _has_dynamo(handle) -> bool:
    import ray

    return ray.get(handle.__ray_call__.remote(lambda _self: "torch._dynamo" in sys.modules), timeout=60)


def test_neither_a_serving_nor_a_training_cluster_imports_dynamo(ray_session, tmp_path):
    import ray
    import torch

    from moe_runtime.runtime.cluster import Cluster
    from tests.runtime.helpers import make_config

    with Cluster.start(make_config(tmp_path, expert_actors=1, router_workers=1)) as c:
        c.forward(torch.zeros(2, 8, dtype=torch.long))
        c.checkpoint(tmp_path / "serving")  # a serving checkpoint: no optimizer state to write, none built
        assert [_has_dynamo(h) for h in c.workers + c.experts] == [False, False]
        c.train(1)
        assert [_has_dynamo(h) for h in c.workers + c.experts] == [False, False]
        assert ray.get(c.experts[0].__ray_call__.remote(lambda self: self._opt is not None and bool(self._opt.state)),
                       timeout=60)  # it did build and step its optimizer
