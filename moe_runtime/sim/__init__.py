"""moe_runtime.sim: predict step times of the expert-parallel runtime on clusters larger than one machine.

- traces.py: routing traces (record from a real run, save/load .npz/.jsonl, synthetic uniform / Zipf / drift);
- cost_model.py: compute / codec / link costs from a GPU datasheet table (tables/*.yaml) or a calibrated host
  table (calibrate.py measures this machine);
- simulator.py: the step simulation (layouts, queues, transfers, gradient sync, optimizer) -> SimResult;
- whatif.py: static vs scheduler placement (`--what-if rebalance`), step time against cluster size;
- plot.py: timeline and scaling figure; cli_impl.py: the body of `moe-runtime simulate`.
"""

from moe_runtime.sim.cost_model import CostModel, HardwareTable, Link, load_table
from moe_runtime.sim.simulator import Layout, SimResult, Simulator, static_placement, summarize
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
    "load_table",
    "load_trace",
    "static_placement",
    "summarize",
    "synthetic_trace",
]
