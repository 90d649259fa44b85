"""moe_runtime.dispatch: the data plane's transport, and nothing else.

codec (tensor frames) -> envelope (the protobuf `Frame` around a frame) -> server (ExpertServer, over an
ExpertBackend: the expert actor's shard state) / client (ExpertClient) -> fanout (concurrent calls) -> remote
(RemoteDispatcher: the model's Dispatcher over gRPC); service holds the names both ends share. Expert math is the
model's (model/experts.py); shard state is the actor's (runtime/expert_shards.py).
"""
