"""``walled-garden`` command line (docs/reference.md, Commands)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from .config import ApiConfig, Config, ConfigError, Reading, default_config_path, read_config
from .subscribers import Subscriber


def _reading(args: argparse.Namespace) -> Reading:
    return read_config(args.config or default_config_path())


def _config(args: argparse.Namespace) -> Config:
    """The whole config, valid, or ``ConfigError``: for the commands that run with it (``run``,
    ``portal``, ``render``)."""
    return _reading(args).valid()


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon. Its state directory is made here first: one it cannot make (a read-only
    file system, a directory it may not write) is a line naming ``state_dir``, not a traceback
    from deep in the start."""
    from .service import run

    reading = _reading(args)
    config = reading.valid()
    try:
        Path(config.state_dir).mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as exc:
        print(f"walled-garden: {reading.where('state_dir')}: {config.state_dir}: cannot create the state "
              f"directory: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return run(config)


def cmd_portal(args: argparse.Namespace) -> int:
    from captive_portal.server import run
    run(_config(args))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config, the list file, the webhook secrets and the portal's branding in one
    pass, and name every problem of all of them.

    Errors (exit 1) name key path or file:line; warnings are advice and keep exit 0. A check
    that needs a config value runs unless that value itself was refused (it is already named).
    """
    reading = read_config(args.config or default_config_path())
    problems = [str(issue) for issue in reading.issues]
    list_problems: list[str] = []
    warnings: list[str] = []
    entries = None
    config = reading.config
    if config is not None:
        source = config.subscribers
        where = reading.where("subscribers", "source")
        if source.source and source.is_url and not reading.refused_within("subscribers"):
            listed, list_problems = _fetch_list(config, where)
            entries = None if listed is None else len(listed)
        elif source.source and not source.is_url and not reading.refused("subscribers", "source"):
            listed, list_problems = _read_list(config, where)
            entries = None if listed is None else len(listed)
            unreadable = unreadable_without_override(source.source, _daemon_groups(config))
            if unreadable and listed is not None:
                problems.append(f"{where}: {unreadable}")
        problems += _secret_problems(reading, config)
        if not reading.refused_within("portal"):  # a default standing in could be misjudged
            from captive_portal.config_check import validate as validate_portal

            problems += validate_portal(config)
        if not reading.issues:
            warnings = config_warnings(config)
    if args.json:
        print(json.dumps({"config": str(reading.path), "ok": not problems and not list_problems,
                          "errors": problems + list_problems, "warnings": warnings,
                          "listed": entries}, indent=2))
        return 1 if problems or list_problems else 0
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    if problems or list_problems:
        print(f"{reading.path}: {len(problems) + len(list_problems)} error(s)", file=sys.stderr)
        for problem in problems + list_problems[:LIST_PROBLEMS_SHOWN]:
            print(f"  {problem}", file=sys.stderr)
        if len(list_problems) > LIST_PROBLEMS_SHOWN:
            print(f"  ... and {len(list_problems) - LIST_PROBLEMS_SHOWN} more problem(s) in the subscriber list "
                  f"({len(list_problems)} in all; --json lists every one)", file=sys.stderr)
        return 1
    assert config is not None  # no problems means the file was read
    listed_text = f", {entries} restricted subscriber(s) listed" if entries is not None else ""
    print(f"{config.path}: OK (table inet {config.gateway.table}{listed_text})")
    return 0


#: ``--json`` of the commands that ask the daemon.
JSON_HELP = "print the daemon's answer as JSON, unchanged (for scripts); the exit status is the same"

#: How many of a list's problems check-config prints: an export with one systematic mistake has
#: one per line (100k lines), and the first few say what it is; the count says how far it goes.
LIST_PROBLEMS_SHOWN = 20


def _secret_problems(reading: Reading, config: Config) -> list[str]:
    """The inbound webhook secret, the promise secret when promises go to billing, and the
    permissions of the RADIUS secrets and of the list source's token and client key (anyone who
    reads those may fetch billing's whole restricted list); each problem named by its key and
    line, then the file."""
    from .api.webhooks import SecretError, load_webhook_secret

    secrets: list[tuple[tuple[str, ...], str]] = []
    if not reading.refused("api", "webhook_secret_file"):
        secrets.append((("api", "webhook_secret_file"), config.api.webhook_secret_file))
    promises = config.policy.promise_to_pay
    if promises.webhook_url and promises.webhook_secret_file and \
            not reading.refused("policy", "promise_to_pay", "webhook_secret_file"):
        secrets.append((("policy", "promise_to_pay", "webhook_secret_file"), promises.webhook_secret_file))
    problems = []
    for i, source in enumerate(config.subscribers.sessions):
        if source.secret_file:   # the RADIUS secret: read by the config reader; here its permissions
            problem = secret_file_problem(source.secret_file, config.api.socket_group)
            if problem:
                problems.append(f"{reading.where('subscribers', 'sessions', i, 'secret_file')}: "
                                f"{problem.replace('webhook secret', 'RADIUS secret')}")
    listing = config.subscribers   # who reads these fetches billing's whole restricted list
    for key_name in ("bearer_token_file", "client_key") if listing.client_key else ("bearer_token_file", "client_cert"):
        path = getattr(listing, key_name)
        if path and not reading.refused("subscribers", key_name):
            problem = secret_file_problem(path, config.api.socket_group)
            if problem:
                problems.append(f"{reading.where('subscribers', key_name)}: "
                                f"{problem.replace('webhook secret', 'list source credential')}")
    for key, path in secrets:
        try:
            load_webhook_secret(path)
        except SecretError as exc:
            problems.append(f"{reading.where(*key)}: {exc}")
            continue
        problem = secret_file_problem(path, config.api.socket_group)
        if problem:
            problems.append(f"{reading.where(*key)}: {problem}")
    return problems


def config_warnings(config: Config) -> list[str]:
    """What is valid but not recommended (check-config prints these and still exits 0)."""
    warnings = []
    if not config.gateway.subscriber_prefixes:
        warnings.append("gateway.subscriber_prefixes is not set, so a list entry, event or operator command may "
                        "name any unicast address, including upstream or server addresses; set it to the "
                        "prefixes subscribers live in, e.g. ['100.64.0.0/10', '2001:db8::/32'] "
                        "(docs/reference.md, Safety rules 1)")
    for i, source in enumerate(config.subscribers.sessions):
        where = f"subscribers.sessions[{i}] ({source.name})"
        if source.path and not os.path.isdir(os.path.dirname(source.path)):
            warnings.append(f"{where}: the directory of {source.path} does not exist; is {source.kind} installed "
                            "here and the path right? (its sessions stay empty until the file appears)")
        if source.kind == "radius" and not source.clients:
            warnings.append(f"{where}: no clients given, so anyone who knows the secret may send accounting; "
                            "set clients to the BNG's addresses")
    from captive_portal import reachability
    from captive_portal.config_check import warnings as portal_warnings

    warnings += reachability.warnings(config, resolve=_resolve_within(RESOLVE_SECONDS))
    warnings += portal_warnings(config)
    return warnings


#: check-config asks the system resolver about portal.url's host for at most this long: a
#: gateway without a working resolver must not hang the check.
RESOLVE_SECONDS = 2.0


def _resolve_within(seconds: float) -> Any:
    """``reachability.resolve_host`` in a daemon thread, given up on (OSError) after ``seconds``."""
    import threading

    from captive_portal.reachability import resolve_host

    def resolve(host: str) -> Any:
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["addresses"] = resolve_host(host)
            except OSError as exc:
                box["error"] = exc

        worker = threading.Thread(target=run, daemon=True, name="resolve-portal-host")
        worker.start()
        worker.join(seconds)
        if "addresses" in box:
            return box["addresses"]
        raise box.get("error") or OSError(f"no answer within {seconds:g} s")

    return resolve


def _daemon_groups(config: Config) -> tuple[int, ...]:
    """The groups the daemon reads files as: root's, the unit's ``SupplementaryGroups``
    (``walled-garden``) and ``api.socket_group``, those that exist."""
    import grp

    gids = [0]
    for name in {"walled-garden", config.api.socket_group} - {""}:
        try:
            gids.append(grp.getgrnam(name).gr_gid)
        except KeyError:
            continue
    return tuple(gids)


def unreadable_without_override(path: str, groups: tuple[int, ...] = (0,)) -> str | None:
    """Why the daemon, as its unit runs it, cannot read ``path`` although we (root) just did.

    The unit keeps only ``CAP_NET_ADMIN``: root without ``CAP_DAC_OVERRIDE`` reads a file only
    through its mode bits, as owner (uid 0), as a member of ``groups`` (gid 0 and the unit's
    supplementary group) or as other, and needs search permission on every directory on the way
    to the file a symlink points at. A list billing wrote 0600 as its own user passes a check run
    by root with every capability and then fails in the daemon; checked only when run as root.
    """
    import stat

    if os.geteuid() != 0:
        return None
    target = os.path.realpath(path)
    chain = [(target, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH, "read it", "r")]
    parent = os.path.dirname(target)
    while True:
        chain.append((parent, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH, "enter it", "x"))
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    for where, owner_bit, group_bit, other_bit, verb, letter in chain:
        try:
            info = os.stat(where)
        except OSError:
            return None   # not there: the reader names that itself
        if info.st_uid == 0:
            allowed = bool(info.st_mode & owner_bit)
        elif info.st_gid in groups:
            allowed = bool(info.st_mode & group_bit)
        else:
            allowed = bool(info.st_mode & other_bit)
        if not allowed:
            shown = "" if where == path else f" (the list {path})"
            return (f"{where}{shown}: the daemon (root without CAP_DAC_OVERRIDE, as systemd runs it) cannot {verb} "
                    f"(owner uid {info.st_uid}, group gid {info.st_gid}, mode {stat.S_IMODE(info.st_mode):04o}); "
                    f"give it group root or the daemon's group with g+{letter}")
    return None


def secret_file_problem(path: str, portal_group: str = "") -> str | None:
    """Why the secret file's permissions let others forge or read webhooks, or None.

    Other users may neither read nor write it, its group may not write it, and it may not be
    readable by the portal's group (``api.socket_group``): the portal would then hold the key
    billing signs with. 0640 with the daemon's own group is fine.
    """
    import grp
    import os
    import stat

    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path}: cannot stat the secret file: {exc.strerror or exc}"
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o007 or mode & 0o020:
        who = "other users" if mode & 0o007 else "its group"
        return (f"{path}: mode {mode:04o} lets {who} read or change the webhook secret; "
                "chmod 600 (or 640 for the daemon's group)")
    if mode & 0o040 and portal_group:
        try:
            portal_gid = grp.getgrnam(portal_group).gr_gid
        except KeyError:
            return None
        if info.st_gid == portal_gid:
            return (f"{path}: mode {mode:04o} and group {portal_group} (api.socket_group) let the portal read "
                    "the webhook secret; chmod 600, or give it another group")
    return None


def _read_list(config: Config, where: str = "subscribers.source") -> tuple[list[Subscriber] | None, list[str]]:
    """The list file's entries, or None and the problems with it (file:line each; a file that
    cannot be read at all behind ``where``, the key that names it); never raises."""
    from .address_space import AddressSpace
    from .sources import read_list_file
    from .subscribers import ListError

    source = config.subscribers.source
    try:
        return read_list_file(source, space=AddressSpace.from_config(config)).subscribers, []
    except ListError as exc:
        return None, [str(i) for i in exc.issues] or [f"{source}: the subscriber list was refused"]
    except OSError as exc:
        return None, [f"{where}: {source}: cannot read the subscriber list: {exc.strerror or exc}"]


def _fetch_list(config: Config, where: str = "subscribers.source") -> tuple[list[Subscriber] | None, list[str]]:
    """``_read_list`` for a URL source: one fetch as the daemon polls it (its timeout, CA,
    client certificate and bearer token), so a list billing serves wrong, or a source out of
    reach, is an error here and not first at the daemon's poll."""
    import aiohttp

    from .address_space import AddressSpace
    from .sources import ListUpdate, SourceFailure, UrlSource, redact_url

    got: list[Subscriber] = []
    failed: list[SourceFailure] = []

    async def on_list(update: ListUpdate) -> None:
        got.extend(update.subscribers)

    async def on_failure(failure: SourceFailure) -> None:
        failed.append(failure)

    async def on_unchanged(origin: str) -> None:   # no ETag or digest was given: never called
        pass

    async def fetch() -> bool:
        source = UrlSource(config.subscribers, on_list, on_failure, on_unchanged,
                           space=AddressSpace.from_config(config))
        async with aiohttp.ClientSession(headers={"User-Agent": "walled-garden check-config"}) as session:
            return await source.poll(session)

    origin = redact_url(config.subscribers.source)
    ok = asyncio.run(fetch())   # every failure to fetch or parse is reported through ``on_failure``
    if not ok or failed:
        refused = f"{where}: {origin}: the subscriber list was refused"
        return None, [f"{where}: {f.message}" for f in failed] or [refused]
    return got, []


def _external_rules(config: Config) -> str:
    """The operator's lines for ``gateway.ipset.rules: external`` (docs/ipset.md), for this
    configuration's interfaces, portal ports, DNS and NTP servers."""
    from .dataplane.iptables_rules import external_lines

    wg = config.walled_garden
    out = ["# rules: external: add these to your own ruleset (docs/ipset.md)"]
    for version in (4, 6):
        out += external_lines(version, config.portal.listen.port, config.gateway.subscriber_interfaces,
                              dns=None if wg.dns is None else tuple(str(a) for a in wg.dns),
                              ntp=None if wg.ntp is None else tuple(str(a) for a in wg.ntp),
                              tls_port=config.portal.tls.listen.port if config.portal.tls else None)
    return "\n".join(out) + "\n"


def cmd_render(args: argparse.Namespace) -> int:
    """Print the transaction a cold start would run with the current list; touches nothing. With
    ``gateway.backend: ipset``: the ipset and iptables-restore text instead of ``nft -f`` text."""
    from .dataplane.fake import FakeDataplane
    from .policy import PolicyInputs
    from .reconciler import Reconciler
    from .table_layout import base_layout

    reading = _reading(args)
    config = reading.valid()
    listed = {}
    if config.subscribers.is_url:
        from .sources import redact_url
        print(f"walled-garden: the subscriber list comes from {redact_url(config.subscribers.source)} and is "
              "fetched at run time: the subscriber sets below are empty", file=sys.stderr)
    else:
        entries, problems = _read_list(config, reading.where("subscribers", "source"))
        if entries is None:
            print(f"walled-garden: cannot render: the subscriber list {config.subscribers.source} "
                  "is not usable:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return 1
        listed = {s.id: s for s in entries}
    fake = FakeDataplane(config.gateway.table)
    Reconciler(fake, base_layout(config)).sync_all(PolicyInputs(listed, {}, {}).decide_all(0.0))
    if config.gateway.backend == "ipset":   # the sets (and our chains) instead of the nft table
        from .dataplane.ipset import render

        sys.stdout.write("".join(render(tx, config.gateway.ipset.rules) for tx in fake.transactions))
        if config.gateway.ipset.rules == "external":
            sys.stdout.write(_external_rules(config))
        return 0
    sys.stdout.write(fake.dump())
    return 0


def _control_socket(args: argparse.Namespace) -> str:
    """``api.socket``, read leniently: the commands that only talk to the daemon must work while
    the file has a mistake the daemon refused at ``SIGHUP`` (it runs on with the config it had),
    or an operator could not lift a paying customer until someone fixed a typo elsewhere. The
    key's value when it reads as a path, else the default; with a one-line warning on stderr
    when the file has errors. ``run``, ``check-config`` and ``render`` stay strict."""
    known = getattr(args, "control_socket", None)
    if isinstance(known, str):
        return known
    reading = _reading(args)
    if reading.config is not None and not reading.refused("api", "socket"):
        socket = reading.config.api.socket
    else:
        socket = ApiConfig.socket
    if reading.issues:
        print(f"walled-garden: warning: the config file {reading.path} currently has {len(reading.issues)} error(s) "
              f"(walled-garden check-config names them); asking the daemon on {socket}", file=sys.stderr)
    args.control_socket = socket
    return socket


def _ask(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request to the daemon; prints the answer itself for ``--json``.

    Returns the answer for the caller to print for a person, or an exit code (int) when
    there is nothing more to do: 1 after an error, 0 after the JSON was printed.
    """
    from .control import ControlError, request

    try:
        answer = request(_control_socket(args), method, path, body)
    except ControlError as exc:
        print(f"walled-garden: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return 0
    return answer


def _ago(seconds: float) -> str:
    """A span for a person: ``5 s``, ``12 min``, ``3 h``, ``2 d`` (rounded; the ISO time beside
    it is exact)."""
    seconds = abs(seconds)
    for unit, size, up_to in (("s", 1, 90), ("min", 60, 90 * 60), ("h", 3600, 48 * 3600)):
        if seconds < up_to:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds / 86400:.0f} d"


def _when(at: Any, now: float | None = None) -> str:
    """A unix time as the operator reads it: UTC ISO and how long ago (or how soon), e.g.
    ``2026-12-01T20:09:10Z (5 s ago)``; ``never`` when there is none. The daemon's answers keep
    unix seconds (``--json``); only the text is for people, who cannot read 1796414902."""
    if not isinstance(at, (int, float)) or isinstance(at, bool) or not at:
        return "never"
    now = time.time() if now is None else now
    try:
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    except (OverflowError, OSError, ValueError):   # out of the platform's range: say what was given
        return f"unix time {at}"
    if at > now + 1:   # a second of leeway: the daemon's clock read a moment before ours
        return f"{iso} (in {_ago(at - now)})"
    return f"{iso} ({_ago(now - at)} ago)"


def _took(seconds: Any) -> str:
    """How long something took: ``1.3 ms`` below a second, ``2.41 s`` from one up."""
    if not isinstance(seconds, (int, float)):
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _sync_line(status: dict[str, Any], now: float) -> str:
    """``kernel: in sync; last sync 2026-12-01T20:09:10Z (5 s ago), partial, 3 elements, 1.3 ms``."""
    state = "in sync" if status["kernel_in_sync"] else "OUT OF SYNC (repairing)"
    sync = status.get("last_sync") or {}
    if not sync:
        return f"kernel: {state}; no sync yet since the start"
    return (f"kernel: {state}; last sync {_when(sync.get('at'), now)}, {sync.get('kind', '-')}, "
            f"{sync.get('elements', 0)} elements, {_took(sync.get('seconds'))}")


def _source_lines(source: dict[str, Any], now: float) -> list[str]:
    """The list source: the list in force (when accepted, how long ago) and its last error."""
    in_force = source.get("list_in_force") or {}
    accepted = in_force.get("loaded_at")
    lines = [f"source: {source['configured']}; list in force: {in_force.get('entries', 0)} entries"
             + (f" from {in_force['origin']}" if in_force.get("origin") else "")
             + (f", accepted {_when(accepted, now)}" if accepted else ", none accepted yet")]
    error = source.get("last_error")
    if error:
        lines.append(f"source error {_when(error.get('at'), now)}: {error['message']} (the list in force stays)")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    status = _ask(args, "GET", "/v1/status")
    if isinstance(status, int):
        return status
    now = time.time()
    modes = ", ".join(f"{k}={v}" for k, v in status["modes"].items())
    print(f"restricted: {modes}")
    print(_sync_line(status, now))
    for line in _source_lines(status["source"], now):
        print(line)
    for held in status["held_changes"]:
        since = f" (held since {_when(held['since'], now)})" if held.get("since") else ""
        print(f"HELD: a list from {held['origin']} would restrict {held['restricting']} and lift "
              f"{held['lifting']}: {held['why']}{since} -> walled-garden approve | reject")
    print(f"payment graces: {status['graces']}; overrides: {status['overrides']}; "
          f"held changes: {len(status['held_changes'])}")
    print(f"exemptions: {status.get('exemptions', 0)}; promises to pay in force: {status.get('promises_active', 0)}; "
          f"outgoing webhooks queued: {status.get('outbox', 0)}")
    print(f"enforcement windows: {status.get('windows', '-')}; restrictions waiting for a window: "
          f"{status.get('waiting_for_window', 0)}")
    for name, source in (status.get("sessions") or {}).items():
        print(_session_line(name, source, now))
    fleet = status.get("fleet")
    if fleet:
        print(f"fleet: gateway {fleet['gateway']}, stream {fleet['stream']}: "
              f"{'connected' if fleet['connected'] else 'NOT CONNECTED'}; applied {fleet['applied_sequence']} of "
              f"{fleet['stream_last_sequence']}, lag {fleet['lag_seconds']}s"
              + ("" if fleet["caught_up"] else "; catching up") + (f"; {fleet['error']}" if fleet.get("error") else ""))
    _print_health(status)
    dns = status.get("dns_forwarder")
    if dns:
        state = "ready" if dns.get("ready") else "running, not ready" if dns.get("running") else "NOT RUNNING"
        print(f"dns forwarder: {state} (pid {dns.get('pid') or '-'}; {', '.join(dns.get('listen', []))}; "
              f"restarts {dns.get('restarts', 0)}"
              + (f"; last exit {dns['last_exit_code']}" if dns.get("last_exit_code") is not None else "")
              + (f"; last error: {dns['last_error']}" if dns.get("last_error") else "") + ")")
    return 0


def _session_line(name: str, source: dict[str, Any], now: float) -> str:
    """One session source: sessions, changes and the last one's time and lag, when it last read
    its file or heard a request (RADIUS), its problems."""
    lag = source.get("last_lag_seconds")
    problems = ", ".join(f"{k}={v}" for k, v in sorted(source.get("problems", {}).items())) or "none"
    heard = [f"last {label} {_when(source[key], now)}" for key, label in (("last_read", "read"),
                                                                          ("last_request", "request"))
             if source.get(key)]
    return (f"sessions {name}: {source.get('sessions', 0)} now, {source.get('changes', 0)} changes"
            + (f", last change {_when(source['last_change'], now)}" if source.get("last_change") else "")
            + (f", last lag {_took(lag)}" if lag is not None else "") + "".join(f", {h}" for h in heard)
            + f"; problems: {problems}"
            + (f" (last: {source['last_problem']})" if source.get("last_problem") else ""))


def _print_health(status: dict[str, Any]) -> None:
    """The lines an operator must not miss: a state database moved aside, rows skipped, tasks
    that failed (and are restarting), addresses held back for a clash (docs/operations.md)."""
    state = status.get("state") or {}
    quarantined = state.get("quarantined")
    if quarantined:
        at = f" at {_when(quarantined['at'])}" if quarantined.get("at") else ""
        print(f"STATE QUARANTINED{at}: the state database was unusable ({quarantined.get('reason')}); moved to "
              f"{quarantined.get('path')}; the daemon started from the list and the kernel")
    kept = state.get("kept_from_kernel")
    if kept:
        print(f"KERNEL KEPT AS IT IS ({kept.get('why')}): {kept.get('addresses')} restricted address(es) stay until "
              "the list is read and enforcement rebuilt from both; webhooks and actions answer 503 meanwhile")
    rebuilt = state.get("rebuilt")
    if rebuilt:
        lifted, keys = rebuilt.get("lifted", 0), rebuilt.get("lifted_keys") or []
        shown = ", ".join(keys)
        more = f" and {lifted - len(keys)} more" if lifted > len(keys) else ""
        print(f"STATE REBUILT {_when(rebuilt['at'])} from the kernel and a list of {rebuilt.get('listed', 0)}: "
              f"{rebuilt.get('kept_free', 0)} listed but free in the kernel kept free (a payment grace); "
              f"{lifted} restricted address(es) no list entry names lifted"
              + (f" ({shown}{more}): an event's or operator's restriction, whose subscriber id went with the state; "
                 "billing must send it again" if lifted else ""))
    if state.get("rows_quarantined"):
        print(f"state rows quarantined: {state['rows_quarantined']} (unreadable rows skipped at start)")
    switch = status.get("backend_switch") or {}
    if switch.get("sets_left_not_emptied"):
        print(f"OLD IPSETS STILL RESTRICTING: {', '.join(switch['sets_left_not_emptied'])}: iptables rules not "
              "ours name them and they could be neither destroyed nor emptied; delete those lines (docs/ipset.md, "
              "Switching)")
    if switch.get("sets_left_emptied"):
        print(f"old ipsets left empty: {', '.join(switch['sets_left_emptied'])} (named by iptables rules not ours; "
              "they restrict nobody); delete those lines and the next start destroys them (docs/ipset.md, Switching)")
    for name, task in sorted((status.get("tasks") or {}).items()):
        if task.get("failures"):
            at = task.get("last_failure_at")
            when = time.strftime(" at %Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if isinstance(at, (int, float)) else ""
            error = f": {task['last_error']}" if task.get("last_error") else ""
            print(f"task {name} FAILED {task['failures']} time(s) since the start, last{when}{error}; "
                  f"{'running again' if task.get('running') else 'restarting'}")
    conflicts = status.get("address_conflicts") or {}
    total = status.get("address_conflicts_total", len(conflicts))
    if total:
        print(f"address conflicts: {total} subscriber(s) not enforced as wanted (an address held by another):")
        for sid, clash in conflicts.items():
            since = f" (since {_when(clash['since'])})" if clash.get("since") else ""
            print(f"  {sid}: wanted {clash.get('wanted')}; {clash.get('detail')}{since}")
        if total > len(conflicts):
            print(f"  ... and {total - len(conflicts)} more (walled-garden status --json)")


def cmd_fleet(args: argparse.Namespace) -> int:
    """``fleet status``: each gateway of the fleet, how far it has applied the stream, when last seen,
    and its clock against NATS's as this gateway estimates it (``-``: not measured; SKEW beyond 30 s,
    where a payment's grace may end early on a gateway ahead of the one that accepted it)."""
    from .fleet.clocks import WARN

    view = _ask(args, "GET", "/v1/fleet")
    if isinstance(view, int):
        return view
    print(f"this gateway: {view['gateway']}; stream {view['stream']}: last sequence {view['stream_last_sequence']}; "
          f"{'connected' if view['connected'] else 'NOT CONNECTED'}"
          + (f" ({view['error']})" if view.get("error") else ""))
    print(f"{'gateway':<24} {'applied':>10} {'behind':>8} {'lag':>8} {'last seen':>12} {'clock':>12}")
    for row in view["gateways"]:
        seen = f"{row['seen_seconds_ago']:.0f}s ago" if row["connected"] else f"{row['seen_seconds_ago']:.0f}s AGO"
        offset = row.get("clock_offset_seconds")
        clock = "-" if offset is None else f"{offset:+.1f}s" + (" SKEW" if abs(offset) > WARN else "")
        print(f"{row['gateway']:<24} {row['applied_sequence']:>10} {row['behind']:>8} {row['lag_seconds']:>7.1f}s "
              f"{seen:>12} {clock:>12}")
    return 0


def _explain_state(answer: dict[str, Any]) -> str:
    """The header's verdict, true to the kernel: what the policy wants and, when the kernel holds
    something else (an address another subscriber holds, a change not applied yet), that too."""
    wanted = answer["mode"] if answer["restricted"] else "free"
    kernel = answer.get("enforced_in_kernel", wanted)
    clash = answer.get("address_conflict")
    if clash:
        wish = clash.get("wanted") or wanted
        if kernel == wish:   # enforced on the rest of its addresses (``claims.uncontested``)
            return f"RESTRICTED ({kernel}) but for {_clash_text(clash)}"
        held = "NOT ENFORCED" if kernel == "free" else f"the kernel keeps {kernel}"
        return f"wanted {wish}, {held} ({_clash_text(clash)})"
    if kernel == wanted:
        return f"RESTRICTED ({wanted})" if answer["restricted"] else "free"
    if kernel == "free":
        return f"wanted {wanted}, NOT ENFORCED yet (the kernel holds them free)"
    return f"wanted {wanted}, the kernel still holds {kernel}"


def _clash_text(clash: dict[str, Any]) -> str:
    """``address 100.64.0.3 held by E-11`` (or the daemon's own words when it gave no address)."""
    if not clash.get("address"):
        return str(clash.get("detail"))
    theirs = clash.get("holders_address")
    mine = f"address {clash['address']}" if theirs in (None, clash["address"]) else \
        f"{clash['address']} (overlapping {theirs})"
    return f"{mine} held by {clash.get('holder')}"


def cmd_explain(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    answer = _ask(args, "GET", f"/v1/explain?q={quote(args.query.strip())}")   # a prefix too: Queries.explain
    if isinstance(answer, int):
        return answer
    now = time.time()
    giver = answer.get("session")   # the session holding the address asked about (SPEC §9)
    given = ""
    if giver:
        whose = giver.get("subscriber") or "no listed subscriber (a paying customer)"
        match = ";".join(f"{k}={v}" for k, v in (giver.get("match") or {}).items()) or "by id"
        until = f" until {_when(giver['expires'], now)}" if giver.get("expires") else " (no expiry)"
        given = (f"  address given by: {giver['source']} session {giver['key']} ({match}), subscriber {whose}, "
                 f"holds {', '.join(giver.get('addresses') or []) or 'nothing now'}{until}")
    if not answer["found"]:
        print(f"{args.query.strip() or answer['query']}: not restricted ({answer['why']})")
        if given:
            print(given)
        return 0
    print(f"{answer['subscriber']} [{answer['reference']}]: {_explain_state(answer)}")
    if given:
        print(given)
    print(f"  why: {answer['why']}")
    if answer["addresses"]:
        print(f"  addresses: {' '.join(answer['addresses'])}")
    clash = answer.get("address_conflict")
    if clash:
        since = f" since {_when(clash['since'], now)}" if clash.get("since") else ""
        print(f"  address conflict{since}: {_clash_text(clash)}; not enforced until it is free "
              "(retried each timer round)")
    if answer["list"]:
        entry = answer["list"]
        print(f"  billing list: {entry['mode']}, reason {entry['reason'] or '-'}")
    else:
        print("  billing list: not listed")
    override, grace = answer["override"], answer["payment_grace"]
    if override:
        at = f", at {_when(override['at'], now)}" if override.get("at") else ""
        print(f"  last event: {override['cause']}{at}")
    if grace:
        until = f", until {_when(grace['until'], now)}" if grace.get("until") else ""
        print(f"  payment grace: {grace['cause']}{until}")
    print(f"  in the kernel now: {answer['enforced_in_kernel']}")
    if answer.get("chain"):
        print("  chain of reasons:")
        for step in answer["chain"]:
            print(f"    - {step}")
    for session in answer.get("sessions") or []:
        print(f"  session {session['source']} {session['key']}: {', '.join(session['addresses']) or 'no address now'}"
              f" ({';'.join(f'{k}={v}' for k, v in session['match'].items()) or 'by id'})")
    if answer.get("audit"):
        from .audit import format_entry
        print("  recent audit:")
        for entry in answer["audit"]:
            print(f"    {format_entry(entry)}")
    return 0


def _control(args: argparse.Namespace, path: str, body: dict[str, Any]) -> int:
    """POST an operator action; print the answer for a person, or as JSON."""
    answer = _ask(args, "POST", path, body)
    if isinstance(answer, int):
        return answer
    if "mode" in answer:
        print(f"{answer.get('subscriber', body.get('subscriber'))}: now {answer['mode']} ({answer.get('cause', '')}); "
              f"{answer.get('connections_flushed') or 0} connection(s) flushed")
    elif "approved" in answer or "rejected" in answer:
        print(verdict_text(answer))
    else:
        print(", ".join(f"{k}: {v}" for k, v in answer.items()))
    return 0


def verdict_text(answer: dict[str, Any]) -> str:
    """``approve``/``reject`` as a sentence (the daemon's answer: ``{approved, restricting,
    lifting, origin}``, ``{rejected, origin, note}``, or in a fleet ``{approved|rejected,
    digest, note}`` for a list this gateway does not hold)."""
    origin = f" from {answer['origin']}" if answer.get("origin") else ""
    if answer.get("approved"):
        if "restricting" in answer or "lifting" in answer:
            return (f"approved: the held list{origin} is now in force; it restricted {answer.get('restricting', 0)} "
                    f"and lifted {answer.get('lifting', 0)} subscriber(s)")
        return f"approved: {answer.get('note') or 'recorded'}"
    note = f"; {answer['note']}" if answer.get("note") else ""
    return f"rejected: the held list{origin} is dropped{note}"


def _was_restricted(before: dict[str, Any] | None, answer: dict[str, Any]) -> tuple[bool, str]:
    """Whether a lifted subscriber was restricted before the lift, and why not. The daemon's
    answer says so when it carries ``was`` (the mode before); else what ``explain`` said just
    before (None when it could not be asked: assumed restricted, the plain answer is printed)."""
    if "was" in answer:
        return answer["was"] != "free", "it was free"
    if before is None:
        return True, ""
    if not before.get("found"):
        return False, str(before.get("why") or "not known to this gateway")
    restricted = bool(before.get("restricted")) or before.get("enforced_in_kernel", "free") != "free"
    return restricted, str(before.get("why") or "")


def cmd_restrict(args: argparse.Namespace) -> int:
    body = {"subscriber": args.id, "reason": args.reason, "mode": args.mode}
    if args.address:
        body["addresses"] = args.address
    return _control(args, "/v1/restrict", body)


def cmd_lift(args: argparse.Namespace) -> int:
    """Lift now. The daemon answers a lift of someone it never restricted as it answers any
    lift (``now free``), which read as if something had changed: the text says so instead."""
    from urllib.parse import quote

    from .control import ControlError, request

    if args.json:
        return _control(args, "/v1/lift", {"subscriber": args.id, "reason": args.reason})
    before = None
    try:
        before = request(_control_socket(args), "GET", f"/v1/explain?q={quote(args.id)}")
    except (ControlError, ValueError):
        pass   # the lift itself says why the daemon cannot be asked
    answer = _ask(args, "POST", "/v1/lift", {"subscriber": args.id, "reason": args.reason})
    if isinstance(answer, int):
        return answer
    restricted, why = _was_restricted(before if isinstance(before, dict) else None, answer)
    sid = answer.get("subscriber", args.id)
    if restricted:
        print(f"{sid}: now {answer.get('mode', 'free')} ({answer.get('cause', '')}); "
              f"{answer.get('connections_flushed') or 0} connection(s) flushed")
    else:
        print(f"{sid}: was not restricted ({why}); nothing to lift (the lift is recorded: {answer.get('cause', '')})")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    return _control(args, "/v1/approve", {"reason": args.reason})


def cmd_reject(args: argparse.Namespace) -> int:
    return _control(args, "/v1/reject", {"reason": args.reason})


def cmd_exempt(args: argparse.Namespace) -> int:
    return _control(args, "/v1/exempt", {"subscriber": args.id, "category": args.category, "until": args.until,
                                         "note": args.note})


def cmd_unexempt(args: argparse.Namespace) -> int:
    return _control(args, "/v1/unexempt", {"subscriber": args.id, "category": args.category, "note": args.note})


def cmd_session(args: argparse.Namespace) -> int:
    """A BNG's ip-up/ip-down script reports a session (accel-ppp: ``walled-garden session start
    --username $PPP_USERNAME --address $PPP_REMOTE``)."""
    body: dict[str, Any] = {key: value for key in ("username", "mac", "circuit_id", "remote_id", "subscriber")
                            if (value := getattr(args, key))}
    if args.address:
        body["addresses"] = args.address
    answer = _ask(args, "POST", f"/v1/session/{args.action}", body)
    if isinstance(answer, int):
        return answer
    owners = ", ".join(answer.get("subscribers") or []) or "no listed subscriber"
    print(f"session {args.action}: {answer.get('sessions')} ({owners})")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    from .audit import format_entry
    since: Since | None = args.since
    query = {k: v for k, v in (("subscriber", args.id), ("since", since.instant if since else None),
                               ("limit", args.limit)) if v}
    answer = _ask(args, "GET", "/v1/audit?" + urlencode(query))
    if isinstance(answer, int):
        return answer
    for entry in answer["entries"]:
        print(format_entry(entry))
    if not answer["entries"]:
        print("no audit entries" + (f" for {args.id}" if args.id else "")
              + (f" since {since.given} ({since.instant})" if since else ""))
    return 0


class Since(NamedTuple):
    """``audit --since``: what the operator typed, and the RFC 3339 UTC instant sent to the daemon."""

    given: str
    instant: str


def since_argument(text: str, now: float | None = None) -> Since:
    """``--since``: a date is the start of that day (UTC: the audit prints UTC), so
    ``--since 2026-12-01`` includes all of that day; an RFC 3339 time as given (without a zone:
    UTC); a span (``30m``, ``1h``, ``2d``, ``1w``) that long before now. The daemon is sent an
    RFC 3339 time with ``Z``, which it reads as is (a bare date it would read as the *end* of
    the day, an exemption's meaning)."""
    from .exemptions import span_seconds

    given = text.strip()
    try:
        span = span_seconds(given.replace(" ", ""))
        if span is not None:
            moment = datetime.fromtimestamp(time.time() if now is None else now, UTC) - timedelta(seconds=span)
        else:
            try:
                moment = datetime.combine(date.fromisoformat(given), datetime.min.time(), UTC)
            except ValueError:
                moment = datetime.fromisoformat(given)
                moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (2026-12-01: from the start of that day, UTC), "
                                         "an RFC 3339 time (2026-12-01T08:00:00Z) or a span such as 30m, 1h, "
                                         "2d") from None
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is out of the range of dates") from None
    return Since(given, moment.isoformat().replace("+00:00", "Z"))


def positive_int(text: str) -> int:
    """``--limit``: a whole number of at least 1 (0 or less would ask for nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import main
    return main()


class _VersionAction(argparse.Action):
    """``--version``: looks the version up only when asked (argparse's own wants it up front)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from .process_metrics import package_version

        print(f"{parser.prog} {package_version()}")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="walled-garden",
                                     description="Keep non-paying subscribers in a walled garden; "
                                                 "let them out the moment they pay.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help=f"config file (default {default_config_path()})")
        p.set_defaults(fn=fn)
        return p

    add("run", cmd_run, "run the enforcer daemon (foreground)")
    add("portal", cmd_portal, "run the captive portal web server")
    check = add("check-config", cmd_check_config, "validate the config, subscriber list, webhook secrets and "
                                                "portal branding; name every problem at once")
    check.add_argument("--json", action="store_true",
                       help="print {config, ok, errors (all of them), warnings, listed} as JSON; exit 1 on errors")
    add("render", cmd_render, "print the nftables ruleset (or the ipsets and iptables chains) that would be installed")
    status = add("status", cmd_status, "show the running daemon's state")
    status.add_argument("--json", action="store_true", help=JSON_HELP)
    explain = add("explain", cmd_explain, "why a subscriber, address or portal reference code is (not) restricted")
    explain.add_argument("query", metavar="ID-or-ADDRESS-or-REFERENCE",
                         help="a subscriber id, an address or prefix, or a portal reference code (WG-XXXX-XXXX)")
    explain.add_argument("--json", action="store_true", help=JSON_HELP)
    restrict = add("restrict", cmd_restrict, "restrict a subscriber now (audited)")
    restrict.add_argument("id")
    restrict.add_argument("--mode", choices=["walled-garden", "notice", "throttle"])
    restrict.add_argument("--address", action="append", help="address or prefix, if not on the list (repeat)")
    lift = add("lift", cmd_lift, "lift a subscriber's restriction now (audited)")
    lift.add_argument("id")
    approve = add("approve", cmd_approve, "apply the list change held by the mass-change guard")
    reject = add("reject", cmd_reject, "drop the list change held by the mass-change guard")
    for p in (restrict, lift, approve, reject):
        p.add_argument("--reason", default="", help="why (recorded with your user name)")
        p.add_argument("--json", action="store_true", help=JSON_HELP)
    from .exemptions import CATEGORIES
    exempt = add("exempt", cmd_exempt, "exempt a subscriber from restriction until a date (audited)")
    exempt.add_argument("id")
    exempt.add_argument("--category", required=True, choices=list(CATEGORIES),
                        help="; ".join(f"{k}: {v}" for k, v in CATEGORIES.items()))
    exempt.add_argument("--until", required=True, help="a date (2026-12-31, through that day), a time, or 14d")
    exempt.add_argument("--note", default="", help="free text for colleagues (recorded with your user name)")
    unexempt = add("unexempt", cmd_unexempt, "end a subscriber's exemption now (audited)")
    unexempt.add_argument("id")
    unexempt.add_argument("--category", choices=list(CATEGORIES), help="only this category (default: all)")
    unexempt.add_argument("--note", default="")
    for p in (exempt, unexempt):
        p.add_argument("--json", action="store_true", help=JSON_HELP)
    session = add("session", cmd_session, "report a BNG session's start or stop (for ip-up/ip-down scripts)")
    session.add_argument("action", choices=["start", "stop"])
    for key in ("username", "mac", "circuit-id", "remote-id"):
        session.add_argument(f"--{key}", dest=key.replace("-", "_"), default="", help=f"the session's {key}")
    session.add_argument("--subscriber", default="", help="the account id, when the script knows it")
    session.add_argument("--address", action="append", help="address or prefix (repeat; stop: default all)")
    session.add_argument("--json", action="store_true", help=JSON_HELP)
    audit = add("audit", cmd_audit, "the audit log: every change of a subscriber's state and its cause")
    audit.add_argument("id", nargs="?", help="one subscriber (default: all)")
    audit.add_argument("--since", type=since_argument, help="a date (from the start of that day, UTC), an RFC 3339 "
                                                            "time, or a span back from now: 30m, 1h, 2d")
    audit.add_argument("--limit", type=positive_int, default=200, help="newest N entries (default 200)")
    audit.add_argument("--json", action="store_true", help=JSON_HELP)
    fleet = add("fleet", cmd_fleet, "the fleet: each gateway's applied stream sequence, lag and last heartbeat")
    fleet.add_argument("action", choices=["status"])
    fleet.add_argument("--json", action="store_true", help=JSON_HELP)
    demo = sub.add_parser("demo", help="simulated ISP in network namespaces: restrict, pay, restore")
    demo.set_defaults(fn=cmd_demo)
    return parser


#: The exit status when stdout was closed early (``status | head -1``): 128 + SIGPIPE, as a
#: command the signal had ended would have.
BROKEN_PIPE = 141


def _stdout_gone() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit finds nowhere to fail
    (it would print ``Exception ignored ... BrokenPipeError``)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):   # not a real file (a test's capture)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.fn(args) or 0)
        if sys.stdout is not None:
            sys.stdout.flush()   # here, where a reader that went away is ours to handle
        return code
    except BrokenPipeError:
        _stdout_gone()
        return BROKEN_PIPE
    except ConfigError as exc:
        print(f"walled-garden: invalid configuration:\n{exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
