"""Joining an existing Ray cluster (`cluster.ray_address`) the way `ray start` and `ray job submit` do, with a
deadline and errors that say what to check.

What Ray 2.60 does on its own, and what we add:
- Token auth: `ray start --head` turns token auth on when a token exists (~/.ray/auth_token, written on the first
  start, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH), but `ray.init(address="host:port")` with an explicit address
  never does, so the GCS answers `InvalidAuthToken`. We enable token mode when RAY_AUTH_MODE is unset and a token
  is available (what `ray start` and `ray.init("auto")` do); an explicit RAY_AUTH_MODE is respected.
- Loopback addresses: Ray replaces 127.0.0.1 / localhost by the machine's own address before connecting, which a
  head bound to loopback does not answer (the connection then retries for minutes). For a loopback address we
  keep the address as given and run the driver on the head node's own IP (read from the GCS node table).
- Deadline: a TCP probe, a GCS probe and `ray.init` each run under `cluster.connect_timeout_s`.
Addresses "auto" and "ray://..." go to Ray unchanged (still under the deadline).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

T = TypeVar("T")
_LOOPBACK_HOSTS = ("localhost", "::1")


class JoinError(RuntimeError):
    """Joining the Ray cluster at cluster.ray_address failed (the message says what to check)."""


@dataclass(frozen=True)
class Joined:
    address: str  # as given
    gcs_address: str  # what Ray connected to (equal to `address` for host:port)
    node_ip: str | None  # the driver's node IP (None: Ray's default)
    dashboard_url: str | None  # http://host:port, None when the head runs no dashboard
    token_auth: bool


def is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in _LOOPBACK_HOSTS


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` -> (host, port); raises JoinError naming the field otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise JoinError(f"cluster.ray_address = {address!r}: expected 'host:port' (the head's GCS port, "
                        f"`ray start --head --port=PORT`), 'auto' or 'ray://host:10001'")
    return host.strip("[]"), int(port)


def _checks(address: str) -> str:
    return (f"check that the head runs (`ray status --address {address}` on the head), that the port is the "
            f"head's GCS port (`ray start --head --port=PORT`, default 6379; not the dashboard 8265 or client "
            f"10001 port) and that no firewall is in the way")


def probe_tcp(address: str, timeout_s: float) -> None:
    """Something listens at host:port, within timeout_s; JoinError with what to check otherwise."""
    host, port = split_host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or type(e).__name__)
        raise JoinError(f"cluster.ray_address = {address!r}: nothing answers at {host}:{port} within "
                        f"{timeout_s:g} s ({reason}); {_checks(address)}") from None


def enable_token_auth_if_available() -> bool:
    """Token mode on when RAY_AUTH_MODE is unset and a token exists (as `ray start` does). Returns whether token
    mode is on."""
    from ray._private.authentication import authentication_token_setup as setup
    from ray._raylet import AuthenticationTokenLoader

    mode = os.environ.get(setup.AUTH_MODE_ENV_VAR)
    if mode is not None:
        return mode.lower() == "token"
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return False
    setup._enable_token_auth()  # what maybe_enable_token_auth_if_token_available does, without its log warning
    return True


def _auth_hint(token_auth: bool) -> str:
    if token_auth:
        return ("the head rejected this machine's token: copy the head's token (`ray get-auth-token` on the head) "
                "to ~/.ray/auth_token, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH")
    return ("the head requires token auth and no token was found: copy the head's token (`ray get-auth-token` "
            "on the head) to ~/.ray/auth_token, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH")


def within(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """fn() on a daemon thread; JoinError after timeout_s (the thread is abandoned: Ray's connect cannot be
    cancelled, and a process that failed to join exits anyway)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name=f"ray-join-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise JoinError(f"{what}: no answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def head_node_ip(address: str, timeout_s: float, token_auth: bool) -> str | None:
    """The head node's IP from the GCS node table (None when the table has no head)."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    def read() -> str | None:
        infos = GcsClient(address=address).get_all_node_info(timeout=timeout_s).values()
        heads = [i.node_manager_address for i in infos if getattr(i, "is_head_node", False) and i.state == 0]
        alive = [i.node_manager_address for i in infos if i.state == 0]
        return (heads or alive or [None])[0]

    try:
        return within(read, timeout_s, f"reading the node table of {address}")
    except AuthenticationError:
        raise JoinError(f"cluster.ray_address = {address!r}: {_auth_hint(token_auth)}") from None
    except JoinError as e:
        raise JoinError(f"cluster.ray_address = {address!r}: {e}; {_checks(address)}") from None
    except Exception as e:  # noqa: BLE001 - any RPC failure: say what to check
        raise JoinError(f"cluster.ray_address = {address!r}: the GCS did not answer ({type(e).__name__}: "
                        f"{str(e)[:200]}); {_checks(address)}") from None


def _keep_loopback_address() -> None:
    """Stop Ray from replacing a loopback GCS address by the machine's address (this process only)."""
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is None:
        import ray._private.ray_constants as constants
    constants.ENABLE_RAY_CLUSTER = False


def join(address: str, timeout_s: float, *, log_to_driver: bool = True) -> Joined:
    """ray.init onto the cluster at `address` within timeout_s; JoinError that says what to check otherwise."""
    import ray

    t0 = time.monotonic()
    left = lambda: max(1.0, timeout_s - (time.monotonic() - t0))  # noqa: E731
    token_auth = enable_token_auth_if_available()
    node_ip = None
    if address != "auto" and not address.startswith("ray://"):
        probe_tcp(address, timeout_s)
        host, _ = split_host_port(address)
        if is_loopback(host):
            node_ip = head_node_ip(address, left(), token_auth)
            _keep_loopback_address()
            if node_ip is None:
                node_ip = "127.0.0.1"
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": log_to_driver, "logging_level": logging.WARNING}
    if node_ip is not None:
        kwargs["_node_ip_address"] = node_ip
    try:
        ctx = within(lambda: ray.init(**kwargs), left(), f"ray.init(address={address!r})")
    except JoinError as e:
        raise JoinError(f"cluster.ray_address = {address!r}: {e}; {_checks(address)}") from None
    except ConnectionError as e:
        raise JoinError(f"cluster.ray_address = {address!r}: {e}; {_checks(address)}") from None
    except Exception as e:  # noqa: BLE001 - auth and RPC errors surface as several types
        if "InvalidAuthToken" in str(e) or "Authentication" in type(e).__name__:
            raise JoinError(f"cluster.ray_address = {address!r}: {_auth_hint(token_auth)}") from None
        raise
    url = getattr(ctx, "dashboard_url", None) or None
    if url and "://" not in url:
        url = "http://" + url
    gcs = (getattr(ctx, "address_info", None) or {}).get("gcs_address", address)
    return Joined(address=address, gcs_address=gcs, node_ip=node_ip, dashboard_url=url,
                  token_auth=os.environ.get("RAY_AUTH_MODE", "").lower() == "token")
