"""``qhx-edge serve``: the SPIFFE Workload API on a Unix socket (docs/issuance.md), and the SPIFFE
bundle endpoint on a TCP address when asked (docs/architecture.md, "Bundle endpoint").

Calls :mod:`qhx_edge.issue.workload_api` with an :class:`~qhx_edge.issue.issuer.Issuer`
for the node home; the bundle endpoint (:mod:`qhx_edge.links.bundle_endpoint`) runs on a trio
loop in a thread of its own, fed by :mod:`qhx_edge.homes.bundles`, and stops with the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qhx_edge.cli import Ctx, pass_ctx


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8443, [::1]:8443)")
    return host, int(port)


@click.command("serve")
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Workload API socket (default: HOME/workload.sock).",
)
@click.option("--bundle-endpoint", "endpoint", metavar="HOST:PORT", help="Also serve our SPIFFE bundle endpoint here.")
@click.option(
    "--bundle-endpoint-profile",
    "profile",
    type=click.Choice(["https_spiffe", "https_web"]),
    default="https_spiffe",
    show_default=True,
    help="https_spiffe: the node's own X509-SVID; https_web: --bundle-endpoint-cert and -key.",
)
@click.option(
    "--bundle-endpoint-id",
    "endpoint_id",
    help="https_spiffe: the endpoint's SPIFFE ID (default: the one registered for qhx-edge:bundle-endpoint).",
)
@click.option(
    "--bundle-endpoint-cert",
    "cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="https_web: certificate chain (PEM).",
)
@click.option(
    "--bundle-endpoint-key", "key", type=click.Path(dir_okay=False, path_type=Path), help="https_web: key (PEM)."
)
@click.option("--bundle-endpoint-path", "path", default="/", show_default=True, help="The path the bundle is at.")
@click.option(
    "--bundle-endpoint-classical",
    "classical",
    is_flag=True,
    help="Serve only authorities classical SPIFFE software reads (no ML-DSA): for SPIRE and go-spiffe.",
)
@click.option("--sync-listen", "sync_listen", metavar="HOST:PORT", help="Accept sync links here.")
@click.option(
    "--sync-peer",
    "sync_peers",
    metavar="HOST:PORT",
    multiple=True,
    help="Keep syncing with this node (repeat for several): every --sync-interval, backing off while unreachable.",
)
@click.option("--sync-interval", default="60s", show_default=True, help="How often to sync with each peer.")
@click.option(
    "--sync-live/--no-sync-live",
    default=True,
    show_default=True,
    help="Keep each sync link open after its contact and push what this node learns the moment it learns it "
    "(peers that do not speak it get plain contacts every --sync-interval).",
)
@click.option(
    "--sync-discover",
    is_flag=True,
    help="Advertise the sync listener over mDNS (_qhx-sync._tcp) on its interface and sync with the peers of "
    "this domain found there (an advertisement is only an address: the link's TLS checks who answers).",
)
@click.option(
    "--watch",
    "watch_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also import each pack that settles in this folder (a USB mount point or drop folder), as 'pack watch' "
    "does (one JSON line per event on stderr).",
)
@click.option(
    "--fetch-partners",
    is_flag=True,
    help="Also poll every partner bundle endpoint recorded by 'federation fetch' (one line per attempt on stderr).",
)
@pass_ctx
def serve(
    ctx: Ctx,
    socket_path: Path | None,
    endpoint: str | None,
    profile: str,
    endpoint_id: str | None,
    cert: Path | None,
    key: Path | None,
    path: str,
    classical: bool,
    sync_listen: str | None,
    sync_peers: tuple[str, ...],
    sync_interval: str,
    sync_live: bool,
    sync_discover: bool,
    watch_dir: Path | None,
    fetch_partners: bool,
) -> None:
    """Serve the SPIFFE Workload API on a Unix socket until SIGTERM or SIGINT.

    With --bundle-endpoint, also serve the domain's SPIFFE bundle endpoint over HTTPS (SPIFFE
    Federation): https_spiffe presents the node's own X509-SVID, registered in the policy for the
    selector qhx-edge:bundle-endpoint; https_web a certificate from files.

    \b
    Examples:
      qhx-edge --home N serve --socket /run/qhx-edge/workload.sock
      qhx-edge --home N serve --bundle-endpoint 0.0.0.0:8443 --bundle-endpoint-classical
      qhx-edge --home N serve --bundle-endpoint 0.0.0.0:443 --bundle-endpoint-profile https_web \\
          --bundle-endpoint-cert web.pem --bundle-endpoint-key web.key
      qhx-edge --home N serve --fetch-partners   # and keep partners' SPIFFE bundles fresh

    With --fetch-partners, each partner whose endpoint 'federation fetch' recorded is fetched at its
    bundle's refresh hint (at least 60 s), as 'federation fetch --poll' does, while the server runs.
    """
    from qhx_edge.issue import workload_api
    from qhx_edge.issue.issuer import Issuer

    home = ctx.home
    sock = (socket_path or home / "workload.sock").absolute()
    info: dict[str, Any] = {"socket": str(sock)}
    text = f"serving the SPIFFE Workload API on {sock}"
    runner = None
    if endpoint is not None:
        if profile == "https_web" and (cert is None or key is None):
            raise click.UsageError("https_web needs --bundle-endpoint-cert and --bundle-endpoint-key")
        if profile == "https_spiffe" and (cert is not None or key is not None):
            raise click.UsageError("--bundle-endpoint-cert and -key are for https_web; https_spiffe uses an SVID")
        host, port = _address(endpoint)
        from qhx_edge.homes.bundles import EndpointSvid, LiveBundle
        from qhx_edge.links import bundle_endpoint as be

        svid = EndpointSvid(home, ctx.passphrase, endpoint_id) if profile == "https_spiffe" else None
        credential: be.CredentialSource
        if svid is not None:
            credential = svid
        else:
            assert cert is not None
            assert key is not None
            credential = be.FileCredential(cert, key)
        server = be.BundleEndpoint(LiveBundle(home, classical=classical), credential, host=host, port=port, path=path)
        runner = be.EndpointThread(server)
        bound_host, bound_port = runner.start()
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        url = f"https://{shown}:{bound_port}{path}"
        info["bundle_endpoint"] = {"url": url, "profile": profile, "classical": classical}
        if server.credential is not None and svid is not None:
            from qhx_edge.core.svid import leaf_spiffe_id

            info["bundle_endpoint"]["spiffe_id"] = leaf_spiffe_id(server.credential.chain[0])
        text += f"\nserving the SPIFFE bundle endpoint at {url} ({profile})"
    sync_service = None
    if sync_listen is not None or sync_peers or sync_discover:
        from qhx_edge.core.policyfile import duration
        from qhx_edge.homes.sync_link import SyncService

        service = SyncService(
            home,
            ctx.passphrase,
            listen_on=_address(sync_listen) if sync_listen is not None else None,
            peers=[_address(p) for p in sync_peers],
            interval=float(duration(sync_interval, "--sync-interval")),
            report=_report_sync,
            discover=sync_discover,
            live=sync_live,
        )
        bound = service.start()
        sync_service = service
        info["sync"] = {"peers": list(sync_peers), "discover": sync_discover, "live": sync_live}
        if bound is not None:
            shown_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            info["sync"]["listening"] = f"{shown_host}:{bound[1]}"
            text += f"\naccepting sync links on {shown_host}:{bound[1]}"
        if sync_peers:
            text += f"\nsyncing with {', '.join(sync_peers)}"
        if sync_discover:
            text += "\nsyncing with the peers found on the local link (_qhx-sync._tcp)"
    watcher = _start_watch(home, watch_dir, ctx.passphrase) if watch_dir is not None else None
    if watch_dir is not None:
        info["watching"] = str(watch_dir)
        text += f"\nimporting the packs that settle in {watch_dir}"
    pollers = _start_pollers(home, info) if fetch_partners else None
    if pollers is not None:
        text += f"\nfetching the bundle endpoints of {', '.join(info['fetching']) or 'no partner (none recorded)'}"
    try:
        workload_api.serve_forever(lambda: Issuer(home, ctx.passphrase), sock, on_ready=lambda: ctx.emit(info, text))
    finally:
        if watcher is not None:
            stop_watch, watch_thread = watcher
            stop_watch.set()
            watch_thread.join(timeout=30)
        if sync_service is not None:
            sync_service.stop()
        if pollers is not None:
            stop, threads = pollers
            stop.set()
            for t in threads:
                t.join(timeout=30)
        if runner is not None:
            runner.stop()
            if svid is not None:
                svid.close()


def _start_watch(home: Path, directory: Path, get_passphrase: Any) -> tuple[Any, Any]:
    """``pack watch DIRECTORY`` in a thread of its own (with its own store connection) until the event is
    set; each event a JSON line on stderr.  The node's keys are unlocked first (sealed packs need them),
    so a wrong passphrase stops the server before it serves."""
    import json
    import sys
    import threading

    from qhx_edge.core.errors import MissingFile, QhxError
    from qhx_edge.homes import watch
    from qhx_edge.homes.node import Node

    if not directory.is_dir():
        raise MissingFile(f"no such directory to watch: {directory}")
    with Node(home, get_passphrase) as n:
        n.identity  # noqa: B018 - unlock now, not at the first sealed pack
    stop = threading.Event()

    def emit(event: watch.Event) -> None:
        print(json.dumps({"watch": event.to_json()}, sort_keys=True), file=sys.stderr, flush=True)

    def run() -> None:
        while not stop.is_set():
            try:
                with Node(home, get_passphrase) as n:
                    watch.Watcher(directory, n, emit=emit).run(stop.is_set)
            except QhxError as exc:  # the store cannot be opened now (locked, busy): say so, try again
                emit(watch.Event("unavailable", message=exc.message, kind=exc.kind))
                stop.wait(5)

    thread = threading.Thread(target=run, name="qhx-watch", daemon=True)
    thread.start()
    return stop, thread


def _start_pollers(home: Path, info: dict[str, Any]) -> tuple[Any, list[Any]]:
    """One thread per recorded partner endpoint running :func:`partner_fetch.poll`; each attempt is a JSON
    line on stderr (stdout carries the server's own ready line)."""
    import json
    import sys
    import threading

    from qhx_edge.homes import partner_fetch
    from qhx_edge.homes.node import Node

    with Node(home) as n:
        domains = n.store.bundle_endpoint_domains()
    info["fetching"] = domains
    stop = threading.Event()
    lock = threading.Lock()

    def report(line: dict[str, Any]) -> None:
        with lock:
            print(json.dumps({"fetch": line}, sort_keys=True), file=sys.stderr, flush=True)

    threads = []
    for domain in domains:
        t = threading.Thread(
            target=partner_fetch.poll, args=(home, domain, report, stop), name=f"fetch {domain}", daemon=True
        )
        t.start()
        threads.append(t)
    return stop, threads


def _report_sync(peer: str, result: Any) -> None:
    """One JSON line per sync contact on stderr (stdout carries the server's ready line)."""
    import json
    import sys

    print(json.dumps({"sync": {"peer_address": peer, **result.to_json()}}, sort_keys=True), file=sys.stderr, flush=True)
