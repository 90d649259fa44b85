"""The names both ends of ExpertService agree on (protos/expert.proto): service, methods, auth metadata, limits."""

from __future__ import annotations

from typing import Any

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "METHOD_BACKWARD",
    "METHOD_BACKWARD_STREAM",
    "METHOD_DISPATCH",
    "METHOD_DISPATCH_STREAM",
    "METHOD_END_STEP",
    "METHOD_HEALTH",
    "SERVICE",
    "TOKEN_METADATA_KEY",
    "auto_chunk_bytes",
    "channel_options",
]

SERVICE = "moe_runtime.expert.ExpertService"
TOKEN_METADATA_KEY = "x-moe-token"
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
# one chunked frame in total (dispatch/chunks.py): the per-message limit applies per message only; this bound only
# keeps a buggy (authenticated: the token gate runs first) peer from making a receiver allocate without limit
DEFAULT_MAX_FRAME_BYTES = 64 << 30
_ENVELOPE_SLACK = 1 << 10  # the Frame envelope (16 bytes) and some room: a chunk message stays under the limit

METHOD_DISPATCH = f"/{SERVICE}/Dispatch"
METHOD_BACKWARD = f"/{SERVICE}/Backward"
METHOD_HEALTH = f"/{SERVICE}/Health"
METHOD_END_STEP = f"/{SERVICE}/EndStep"
METHOD_DISPATCH_STREAM = f"/{SERVICE}/DispatchStream"  # chunked frames (dispatch/chunks.py)
METHOD_BACKWARD_STREAM = f"/{SERVICE}/BackwardStream"


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """gRPC options of a server or channel that carries messages up to `max_message_bytes`."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def auto_chunk_bytes(max_message_bytes: int) -> int:
    """Chunk size for a frame that does not fit one message of `max_message_bytes`: large chunks (fewer messages,
    less per-message work) but each message, envelope included, well inside the limit."""
    return max(1 << 12, min(8 << 20, (max_message_bytes - _ENVELOPE_SLACK) // 2))
