"""Network changes, as the kernel announces them (docs/architecture.md, "Sync protocol": live links).

A field link comes back as a carrier, an address or a route appearing on the node (a radio back in
range, a satellite modem re-associating).  ``serve``'s diallers back off to 300 s while a peer is out of
reach; :func:`watch` wakes them the moment the node's own network changes, so a link is found when it
comes up rather than at the next retry.  Linux only (an rtnetlink socket, joined to the link, address
and route groups); elsewhere, or without the socket, it returns at once and the diallers keep their
backoff.  A message is only a hint to dial now: nothing in it is read, trusted or acted on otherwise.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

# rtnetlink multicast groups (linux/rtnetlink.h): links, IPv4 and IPv6 addresses and routes.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
SETTLE = 0.2  # s: changes this close together wake the diallers once (a link up, then its address and route)


async def watch(
    on_change: Callable[[], None], *, task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED
) -> None:
    """Call ``on_change`` after every burst of network changes, until cancelled; ``task_status.started``
    says whether changes can be watched here at all (False: it returns at once)."""
    family = getattr(socket, "AF_NETLINK", None)
    if family is None:
        task_status.started(False)
        return
    try:
        sock = trio.socket.socket(family, socket.SOCK_RAW, getattr(socket, "NETLINK_ROUTE", 0))
        await sock.bind((0, GROUPS))
    except OSError as exc:
        log.info("network changes cannot be watched here (%s): diallers keep their backoff", exc)
        task_status.started(False)
        return
    with sock:
        task_status.started(True)
        while True:
            await _message(sock)
            with trio.move_on_after(SETTLE):  # drain the rest of the burst
                while True:
                    await _message(sock)
            try:
                on_change()
            except Exception:  # a dialler's trouble never ends the watch
                log.exception("waking the diallers after a network change failed")


async def _message(sock: trio.socket.SocketType) -> None:
    """One message, or an overflow (ENOBUFS: messages were lost, so something changed): either is news.
    Any other error of the socket is news too, after a pause (the watch never ends sync)."""
    try:
        await sock.recv(65536)
    except OSError as exc:
        if exc.errno != errno.ENOBUFS:
            log.info("the network watch socket failed (%s); trying again", exc)
            await trio.sleep(1.0)
