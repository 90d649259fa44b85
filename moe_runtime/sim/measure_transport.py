"""Two-process timings for a host cost table: Dispatch round trips through the real data plane, and the gloo
all-reduce of the router workers' dense gradients.

The peers run in fresh interpreters (``_child``: no multiprocessing, so any caller works, scripts without a
__main__ guard included). These are wall times, divided by the stretch ``measure.machine_state`` measured
around them: the table describes this machine idle, one process at a time.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence

import torch

from moe_runtime.dispatch.client import ExpertClient
from moe_runtime.dispatch.codec import decode_frame, encode_frame
from moe_runtime.dispatch.server import ActivationKey, ActivationsMissing, BackendSummary, ExpertServer
from moe_runtime.model.experts import grouped_swiglu_forward_saving
from moe_runtime.sim.measure import fit_line, machine_state, median_time

__all__ = ["measure_allreduce", "measure_rpc"]


def _child(code: str, *args: object) -> subprocess.Popen:
    """A fresh interpreter running `code` (a call into this module) with args in argv."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip


class _OneTinyExpert:
    """The calibration server's backend: one expert of inner size 1 (compute ~ 0). The round trips ask it to save
    nothing, so it keeps no activations and has none for a backward."""

    placement_version = 0
    hosted = frozenset({(0, 0)})

    def __init__(self, d: int):
        self.d = d
        self.weights = (torch.zeros(d, 2), torch.zeros(1, d))

    def hidden_size(self, layer: int, expert: int) -> int:
        return self.d

    def forward(self, layer: int, experts: Sequence[int], counts: Sequence[int], x_nd: torch.Tensor,
                save_as: ActivationKey | None) -> torch.Tensor:  # fmt: skip
        return grouped_swiglu_forward_saving(x_nd, counts, [self.weights] * len(experts))[0]

    def backward(self, layer: int, experts: Sequence[int], counts: Sequence[int], dy_nd: torch.Tensor,
                 saved_as: ActivationKey) -> torch.Tensor:  # fmt: skip
        raise ActivationsMissing(saved_as)

    def end_step(self, step: int) -> tuple[int, int]:
        return 0, 0

    def abort_step(self, step: int) -> tuple[int, int]:
        return 0, 0

    def summary(self) -> BackendSummary:
        return BackendSummary(placement_version=0, num_shards=1, saved_entries=0, saved_bytes=0)


def _serve_main() -> None:
    """Child process: an ExpertServer with one tiny expert and a raw TCP echo socket. Prints
    "address echo_port", serves until stdin closes."""
    d, token = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    server = ExpertServer(_OneTinyExpert(d), "127.0.0.1", 0, auth_token=token)
    address = server.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)

    def echo() -> None:
        c, _ = sock.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := c.recv(64):
            c.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    print(address, sock.getsockname()[1], flush=True)
    sys.stdin.read()
    server.stop(0)


def measure_rpc(d: int, wire: torch.dtype, codec: dict[str, float], quick: bool = False) -> dict[str, float]:
    """Dispatch round trips through the real data plane to a server in another process, minus the codec: a
    message costs ``cpu_s`` of a core plus ``bytes / bandwidth``, then waits ``alpha_s`` (half a raw TCP round
    trip measured to the same process)."""
    token = secrets.token_hex(8)
    proc = _child("from moe_runtime.sim.measure_transport import _serve_main; _serve_main()", d, token)
    try:
        line = proc.stdout.readline().split()
        if len(line) != 2:
            raise RuntimeError("calibration server did not start")
        address, echo_port = line[0], int(line[1])
        s = socket.create_connection(("127.0.0.1", echo_port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def ping() -> None:
            s.sendall(b"x" * 16)
            s.recv(64)

        stretch0 = machine_state()["stretch"]
        tcp_rtt = median_time(ping, 5, inner=50)
        s.close()
        client = ExpertClient(address, token, lane=True)  # the data plane the runtime runs (transport.lane "tcp")
        sizes, rtts = [], []
        step = [0]
        for rows in ([4, 256, 2048] if quick else [4, 64, 512, 2048, 4096]):
            x = torch.randn(rows, d)

            def rtt(x: torch.Tensor = x, rows: int = rows) -> None:
                step[0] += 1
                buf = encode_frame("dispatch", layer=0, step=step[0], mb=0, pv=0, experts=[0], counts=[rows],
                                   tensors={"x": x}, wire_dtype=wire, meta={"save": False})  # fmt: skip
                decode_frame(client.dispatch(buf).result(), out_dtype=torch.float32)

            rtts.append(median_time(rtt, 5 if quick else 7, inner=3, warmup=3))
            sizes.append(rows * d * torch.finfo(wire).bits // 8)
        client.close()
        stretch = (stretch0 + machine_state()["stretch"]) / 2
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    # wall times on a shared machine: divide by how stretched a process was then (machine_state)
    rtts = [t / stretch for t in rtts]
    tcp_rtt /= stretch
    intercept, slope = fit_line(sizes, rtts)
    alpha = tcp_rtt / 2
    # RTT = 2 (cpu + alpha) + 2 bytes / bw + 2 codec(bytes), codec(b) = 2 fixed + per_byte b
    cpu = max(0.0, (intercept - 4 * codec["fixed_s"]) / 2 - alpha)
    inv_bw = max(slope / 2 - codec["s_per_byte"], 1e-12)
    return {"alpha_s": alpha, "cpu_s": cpu, "bandwidth": 1.0 / inv_bw, "rtt_intercept_s": intercept,
            "rtt_s_per_byte": slope, "tcp_rtt_s": tcp_rtt, "bytes": sizes, "rtt_s": rtts, "stretch": stretch}  # fmt: skip


def _allreduce_main() -> None:
    """Child process: rank argv[1] of a 2-rank gloo group on port argv[2]; rank 0 prints the times as JSON."""
    import torch.distributed as dist

    rank, port, sizes = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = []
    for n in sizes:
        t = torch.ones(n // 4)
        res.append(median_time(lambda t=t: dist.all_reduce(t), 5, warmup=2))
    dist.destroy_process_group()
    print(json.dumps(res), flush=True)


def measure_allreduce(quick: bool = False) -> dict[str, float]:
    """gloo all_reduce between two processes: a 2-rank ring takes 2 alpha + bytes / bandwidth."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sizes = [1 << 12, 1 << 20, 1 << 22] if quick else [1 << 12, 1 << 20, 1 << 22, 1 << 24]
    code = "from moe_runtime.sim.measure_transport import _allreduce_main; _allreduce_main()"
    stretch0 = machine_state()["stretch"]
    procs = [_child(code, r, port, json.dumps(sizes)) for r in range(2)]
    try:
        out = [p.communicate(timeout=300)[0] for p in procs]
        stretch = (stretch0 + machine_state()["stretch"]) / 2
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"gloo all-reduce calibration failed (exit codes {[p.returncode for p in procs]})")
    times = [t / stretch for t in json.loads(out[0].strip().splitlines()[-1])]
    intercept, slope = fit_line(sizes, times)
    return {"alpha_s": intercept / 2, "bandwidth": 1.0 / max(slope, 1e-12), "bytes": sizes, "times_s": times,
            "stretch": stretch}  # fmt: skip
