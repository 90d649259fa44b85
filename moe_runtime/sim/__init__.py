"""moe_runtime.sim: predict step times of the expert-parallel runtime on clusters larger than one machine.

- traces.py: routing traces (record from a real run, save/load .npz/.jsonl, synthetic uniform / Zipf / drift);
- hardware.py: hardware tables: GPU datasheets (tables/*.yaml) or a calibrated host (calibrate.py measures it);
- cost_model.py: the one interface the engine asks (per-call costs, and the resources one step's jobs share),
  implemented by gpu_cost.py (roofline; FIFO GPUs and link ports) and host_cost.py (measured; shared cores);
- simulator.py: the engine (waves of compute and exchanges, gradient sync, optimizer) -> SimResult
  (results.py), on a Layout (layout.py), with per-layer work from the replica split (work.py) and the
  vectorised queues of queues.py;
- two_batch.py: transport.overlap two_batch, the two halves of a micro-batch pipelined on the same resources;
- whatif.py: static vs scheduler placement (`--what-if rebalance`), overlap none vs two_batch (`--what-if
  overlap`), step time against cluster size;
- plot.py: timeline and scaling figure; cli_impl.py: the body of `moe-runtime simulate`.
"""

from moe_runtime.sim.cost_model import CostModel
from moe_runtime.sim.hardware import HardwareTable, Link, load_table
from moe_runtime.sim.layout import Layout, static_placement
from moe_runtime.sim.results import SimResult, summarize
from moe_runtime.sim.simulator import Simulator, build_cost_model
from moe_runtime.sim.traces import RoutingTrace, TraceRecorder, load_trace, synthetic_trace

__all__ = [
    "CostModel",
    "HardwareTable",
    "Layout",
    "Link",
    "RoutingTrace",
    "SimResult",
    "Simulator",
    "TraceRecorder",
    "build_cost_model",
    "load_table",
    "load_trace",
    "static_placement",
    "summarize",
    "synthetic_trace",
]
