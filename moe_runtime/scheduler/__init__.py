"""Expert load balancing.

- load.py: load snapshots, balance metrics, the EMA tracker.
- policy.py: `decide`, the pure placement policy, read top to bottom; its stages: targets.py (whole-layer plans),
  matching.py (relabelling actors for maximum overlap), knapsack.py (choosing plans under the budget, the EPLB
  floor), search.py (local search over replica changes), on layer.py's working state; types.py its inputs and
  output.
- eplb.py: the DeepSeek EPLB baseline the policy is measured against.
- trigger.py: when to rebalance, a pure function of a load snapshot.
- fleet.py: the ExpertFleet protocol migration works through; migrate.py applies a decision through it.
- hook.py: the controller in the train loop (feeds the trigger, decides, migrates, measures).
"""
