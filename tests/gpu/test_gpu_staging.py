"""HostStaging (model/device.py): the identity on the CPU, pinned + one copy each way on CUDA."""

from __future__ import annotations

import threading

import pytest
import torch

from moe_runtime.model.device import HostStaging
from tests.gpu.gpu_marks import gpu_only


def test_cpu_staging_is_the_identity():
    st = HostStaging("cpu")
    x = torch.randn(5, 3)
    assert st.to_device(x) is x
    assert st.to_host(x, torch.bfloat16) is x  # on the CPU the codec casts, as before
    buf = st.host_buffer((5, 3), torch.float32)
    assert not buf.is_pinned() and st.upload(buf) is buf
    assert st.h2d_bytes == st.d2h_bytes == 0


@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16])
@gpu_only
def test_cuda_round_trip_pinned_and_reused(wire):
    st = HostStaging("cuda")
    for rows in (7, 300, 5):  # grows once, then reuses the buffer
        x = torch.randn(rows, 64)
        x_dev = st.to_device(x)
        assert x_dev.is_cuda and torch.equal(x_dev.cpu(), x)
        back = st.to_host(x_dev * 2, wire)
        assert back.is_pinned() and back.dtype == wire
        torch.testing.assert_close(back, (x * 2).to(wire))
    assert st.h2d_bytes == sum(r * 64 * 4 for r in (7, 300, 5))


@gpu_only
def test_cuda_staging_threads_do_not_share_buffers():
    st = HostStaging("cuda")
    errors = []

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(20):
            x = torch.randn(128, 32, generator=g)
            y = st.to_host(st.to_device(x) + seed)
            if not torch.equal(y, x + seed):
                errors.append(seed)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
