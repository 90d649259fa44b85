"""moe_runtime.generation: incremental decoding over the model's KV / LFA caches.

sampling.py (per-request sampling parameters; greedy, temperature, top-k, top-p with seeded generators),
stopping.py (stop strings), byte_tokenizer.py (the presets' byte-level vocabulary), backend.py (where the model
and its caches run: this process, or the full-recompute oracle), engine.py (prefill, decode steps, continuous
batching).
"""
