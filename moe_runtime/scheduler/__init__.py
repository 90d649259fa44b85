"""Expert load balancing: load tracking (load.py), the pure placement policy (policy.py) and the DeepSeek
EPLB baseline it is measured against (eplb.py)."""
