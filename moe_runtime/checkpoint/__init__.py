"""HF-layout Yuan 2.0-M32 checkpoints in and out (streamed, tensor by tensor) and their SentencePiece tokenizer.

Modules: hf_config (config.json <-> ModelConfig), hf_layout (the name/shape rules), hf_reader (validate, then read
per tensor), hf_writer (planned shards, written per tensor from any process), in_process (a whole model in one
process), tokenizer. This package imports config and model only: no transport, runtime, Ray or gRPC.
"""
