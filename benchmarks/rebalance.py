"""Expert rebalancing, all parts in one run: our placement policy (`decide`) against DeepSeek EPLB.

    python benchmarks/rebalance.py [--quick [--cluster-in-quick]] [--json] [--skip-cluster] [--skip-recorded]

Runs the three experiments, each also a script of its own (their docstrings say what each measures):
1. rebalance_synthetic.py: synthetic Zipf load on the Yuan 2.0-M32 shape, cold and steady cases;
2. rebalance_recorded.py: load recorded from a training run, replayed with re-planning every K steps
   (--skip-recorded skips it);
3. rebalance_cluster.py: step time of a skewed router on a real 2-actor cluster, static vs rebalanced
   (--skip-cluster skips it; --quick too, unless --cluster-in-quick).

Last stdout line (and runs/bench/rebalance.json): balancedness_ours / balancedness_eplb (means over the
synthetic cases), bytes_moved_ours_vs_eplb (sum of our bytes / sum of aligned-EPLB bytes over the synthetic
cases; goal <= 1), skewed_step_time_static_vs_rebalanced (with the cluster part's gains, their spread and the
second destination's cost: rebalance_cluster.py), and each part's detail under "synthetic",
"recorded" and "cluster".
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import rebalance_cluster, rebalance_recorded, rebalance_synthetic
from benchmarks._common import emit
from benchmarks._rebalance_common import ScriptRun, fmt, policy_params_json

NAME = "rebalance"


def add_skip_args(p) -> None:
    p.add_argument("--skip-cluster", action="store_true", help="skip part 3 (real local cluster)")
    p.add_argument("--skip-recorded", action="store_true", help="skip part 2 (training run on the corpus)")


def main(argv: list[str] | None = None) -> dict:
    parts = (rebalance_synthetic, rebalance_recorded, rebalance_cluster)
    run = ScriptRun.start(NAME, __doc__.split("\n\n")[0], [add_skip_args] + [m.add_args for m in parts], argv)
    args, console = run.args, run.console
    progress = console.log
    synthetic = rebalance_synthetic.run_from_args(args, progress)
    recorded = None
    if not args.skip_recorded:
        load_log = args.out.with_name(args.out.stem + "_recorded_load.jsonl")
        recorded = rebalance_recorded.run_from_args(args, load_log, progress)
    cluster = rebalance_cluster.cluster_part(
        args.quick, args.cluster_in_quick, args.seed, skip=args.skip_cluster, progress=progress
    )
    result = {
        "bench": NAME,
        **rebalance_synthetic.headline(synthetic),
        **cluster,
        "headline_note": rebalance_synthetic.HEADLINE_NOTE,
        "policy_params": policy_params_json(),
        "quick": args.quick,
        "synthetic": synthetic,
        "recorded": recorded,
        **run.clock(),
    }

    rebalance_synthetic.print_tables(console, synthetic)
    if recorded:
        rebalance_recorded.print_table(console, recorded)
    rebalance_cluster.print_summary(console, cluster["cluster"])
    console.print(
        f"balancedness ours {fmt(result['balancedness_ours'])} vs EPLB {fmt(result['balancedness_eplb'])}; "
        f"bytes moved ours / EPLB (aligned) = {fmt(result['bytes_moved_ours_vs_eplb'])} (goal <= 1), "
        f"raw EPLB {fmt(result['bytes_moved_ours_vs_eplb_raw'])}; cluster part: {result['cluster_part']}; "
        f"{result['seconds']:.1f} s"
    )
    if not args.json:
        print(
            f"{NAME}: {rebalance_synthetic.summary_line(result)}, skewed step time static/rebalanced "
            f"{fmt(result['skewed_step_time_static_vs_rebalanced'])}"
        )
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
