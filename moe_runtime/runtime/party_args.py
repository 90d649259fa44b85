"""The constructor arguments a party (ExpertActor, RouterWorker) runs with: the latest ones a relaunch gave its
processes (runtime/relaunch.py), kept in Ray's internal KV under the token the processes were created with,
because a party Ray restarts gets its *first* constructor arguments again."""

from __future__ import annotations

import pickle

_KV_PREFIX = b"moe_runtime/relaunch/"


def kv_key(origin_token: str) -> bytes:
    return _KV_PREFIX + origin_token.encode()


def current_args(config: dict, auth_token: str) -> tuple[dict, str]:
    """(config, auth_token) of a party constructor: the relaunched ones when the processes created with
    `auth_token` were relaunched since, else as given."""
    try:
        from ray.experimental import internal_kv
    except ImportError:
        return config, auth_token
    if not internal_kv._internal_kv_initialized():  # constructed outside Ray (tests): nothing relaunched
        return config, auth_token
    blob = internal_kv._internal_kv_get(kv_key(auth_token))
    return (config, auth_token) if blob is None else pickle.loads(blob)


__all__ = ["current_args", "kv_key"]
