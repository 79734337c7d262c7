"""Joining a Ray cluster: the checks every Ray-backed command makes first (serving, indexing)."""

from __future__ import annotations

import socket

from galr.errors import InputError, UnavailableError


def check_address_form(address: str) -> None:
    """Refuse an address that is not ``HOST:PORT``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"a Ray address is HOST:PORT of the Ray head (e.g. 10.0.0.5:6379), got {address!r}")


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a Ray address nothing answers at, at once (``ray.init`` would retry for minutes).

    Raises:
        InputError: not ``HOST:PORT``.
        UnavailableError: no TCP listener at ``address``.
    """
    check_address_form(address)
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        raise UnavailableError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                               "`ray start --head`, or leave out the address to run Ray on this machine") from None


__all__ = ["check_address", "check_address_form"]
