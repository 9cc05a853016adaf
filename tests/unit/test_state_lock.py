"""One ``walled-garden run`` per state directory, and a live control socket is never taken over.

A second daemon on the same state directory used to sync the same table, write the same SQLite,
crash-loop its webhook worker on the port, and unlink the first one's control socket and bind its
own: when it stopped, the first daemon was unreachable. Now the second exits 1 with one line before
it touches anything (``state_lock``), and a control socket someone answers on is never unlinked
(``api.listeners.socket_problem``), whichever state directory the newcomer has.

The daemons here are real processes running the real ``walled-garden run``; only the kernel is
stood in for (the fake dataplane, no conntrack, no table ownership question): the lock and the
socket come before any of it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from enforcer import state_lock
from enforcer.api.listeners import SocketInUse, socket_problem, start_unix_site
from enforcer.control import ControlError, request

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
#: ``walled-garden run`` with the kernel stood in for: everything else is the real daemon.
BOOT = """
import sys
import enforcer.daemon as daemon
import enforcer.service as service
from enforcer.cli import main
from enforcer.dataplane.fake import FakeDataplane

class NoConntrack:
    async def flush(self, networks, keep_mark=0):
        return 0

daemon.build_dataplane = lambda config: FakeDataplane()
daemon.Conntrack = NoConntrack
service.table_problem = lambda config: None
sys.exit(main(sys.argv[1:]))
"""
#: Bounds of every wait here (seconds).
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(tmp: Path, name: str, state: Path, control: Path, port: int) -> Path:
    (tmp / "webhook.secret").write_text(SECRET + "\n")
    os.chmod(tmp / "webhook.secret", 0o600)
    (tmp / "l.yaml").write_text("subscribers:\n  - {id: C-1, addresses: [100.64.0.10], reason: overdue}\n")
    raw: dict[str, Any] = {
        "state_dir": str(state),
        "subscribers": {"source": str(tmp / "l.yaml")},
        "walled_garden": {"allow": ["192.0.2.0/24"]},
        "api": {"socket": str(control), "listen": f"127.0.0.1:{port}",
                "webhook_secret_file": str(tmp / "webhook.secret")},
        "metrics": {"listen": None, "portal_listen": None},
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(raw))
    return path


class Daemons:
    """``walled-garden run`` processes, each in its own process group (its webhook worker too),
    all stopped at the end whatever happened."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, config: Path, name: str) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.out", "wb") as out, open(self.tmp / f"{name}.err", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", BOOT, "run", "--config", str(config)], cwd=ROOT,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(proc)
        return proc

    def output(self, name: str) -> str:
        return "".join((self.tmp / f"{name}.{kind}").read_text(errors="replace") for kind in ("out", "err"))

    def wait_ready(self, proc: subprocess.Popen[bytes], control: Path, name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{self.output(name)}"
            if answers(control):
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} not ready within {START_TIMEOUT}s:\n{self.output(name)}")

    def exit_code(self, proc: subprocess.Popen[bytes], name: str) -> int:
        """``proc``'s exit code; one still running after ``EXIT_TIMEOUT`` fails the test, naming what it said."""
        try:
            return proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still runs after {EXIT_TIMEOUT}s:\n{self.output(name)[-3000:]}") from None

    def stop(self, proc: subprocess.Popen[bytes]) -> int:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        return proc.wait(EXIT_TIMEOUT)

    def close(self) -> None:
        for proc in self.procs:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)   # the group: the webhook worker goes too
                except ProcessLookupError:
                    break
                try:
                    proc.wait(EXIT_TIMEOUT / 2)
                except subprocess.TimeoutExpired:
                    continue


def answers(control: Path) -> bool:
    try:
        request(str(control), "GET", "/v1/status", timeout=2.0)
        return True
    except (ControlError, OSError):
        return False


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    started = Daemons(tmp_path)
    try:
        yield started
    finally:
        started.close()


# -- the lock itself ----------------------------------------------------------------------------

HOLD = """
import sys, time
from enforcer import state_lock
try:
    lock = state_lock.acquire(sys.argv[1])
except state_lock.StateLocked as exc:
    print(exc, flush=True)
    sys.exit(3)
print("held", flush=True)
time.sleep(60)
"""


def test_the_lock_names_its_holder_and_lets_go_when_released(tmp_path: Path) -> None:
    state = tmp_path / "state"
    lock = state_lock.acquire(str(state))
    assert (state / state_lock.LOCK_NAME).read_text() == f"{os.getpid()}\n"
    other = subprocess.run([sys.executable, "-c", HOLD, str(state)], cwd=ROOT, capture_output=True, text=True,
                           timeout=EXIT_TIMEOUT)
    assert other.returncode == 3
    assert other.stdout.strip() == f"another walled-garden run (pid {os.getpid()}) holds {state}; stop it first"
    lock.release()
    again = state_lock.acquire(str(state))   # released: free for the next run
    again.release()


def test_a_killed_holder_leaves_no_lock_behind(tmp_path: Path) -> None:
    state = tmp_path / "state"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(state)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(state_lock.StateLocked) as refused:
            state_lock.acquire(str(state))
        assert refused.value.pid == holder.pid
        holder.kill()   # SIGKILL: no clean-up of its own
        holder.wait(EXIT_TIMEOUT)
        state_lock.acquire(str(state)).release()   # the kernel dropped it; the stale pid in the file does not count
    finally:
        holder.kill()
        holder.wait(EXIT_TIMEOUT)
        if holder.stdout is not None:
            holder.stdout.close()


# -- two real daemons ------------------------------------------------------------------------------

def test_a_second_run_on_the_same_state_dir_exits_at_once_and_the_first_stays_reachable(
        tmp_path: Path, daemons: Daemons) -> None:
    state, control = tmp_path / "state", tmp_path / "control.sock"
    config = write_config(tmp_path, "config.yaml", state, control, free_port())
    first = daemons.start(config, "first")
    daemons.wait_ready(first, control, "first")
    socket_inode = control.stat().st_ino

    second = daemons.start(config, "second")
    code = daemons.exit_code(second, "second")
    said = daemons.output("second")
    assert code == 1, said
    assert said.strip() == f"another walled-garden run (pid {first.pid}) holds {state}; stop it first"
    assert "Traceback" not in said
    # the first is untouched: its socket file is its own, and it still answers
    assert control.stat().st_ino == socket_inode
    assert answers(control) and first.poll() is None

    assert daemons.stop(first) == 0
    third = daemons.start(config, "third")   # the lock went with the first: a restart is not kept out
    daemons.wait_ready(third, control, "third")


def test_a_run_with_another_state_dir_never_takes_over_a_live_control_socket(
        tmp_path: Path, daemons: Daemons) -> None:
    control = tmp_path / "control.sock"
    first = daemons.start(write_config(tmp_path, "a.yaml", tmp_path / "a", control, free_port()), "first")
    daemons.wait_ready(first, control, "first")
    socket_inode = control.stat().st_ino

    other = daemons.start(write_config(tmp_path, "b.yaml", tmp_path / "b", control, free_port()), "other")
    code = daemons.exit_code(other, "other")
    said = daemons.output("other")
    assert code == 1, said
    assert said.strip() == (f"api.socket: {control} is answered by another process (another walled-garden run?); "
                            "stop it first")
    assert not (tmp_path / "b" / "state.sqlite3").exists()   # refused before the state was opened
    assert control.stat().st_ino == socket_inode
    assert answers(control) and first.poll() is None


# -- the control socket's file -------------------------------------------------------------------

async def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX) as dead:   # bound, never listening, then gone: a killed run's file
        dead.bind(str(path))
    assert socket_problem(str(path)) is None
    runner = await start_unix_site(web.Application(), str(path))
    try:
        _reader, writer = await asyncio.open_unix_connection(str(path))
        writer.close()
        await writer.wait_closed()
    finally:
        await runner.cleanup()


async def test_a_live_socket_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    live = await start_unix_site(web.Application(), str(path))
    try:
        inode = path.stat().st_ino
        with pytest.raises(SocketInUse, match="is answered by another process"):
            await start_unix_site(web.Application(), str(path))
        assert path.stat().st_ino == inode
        _reader, writer = await asyncio.open_unix_connection(str(path))   # the first still serves
        writer.close()
        await writer.wait_closed()
    finally:
        await live.cleanup()


async def test_a_file_that_is_not_a_socket_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("the operator's\n")
    with pytest.raises(SocketInUse, match="exists and is not a socket"):
        await start_unix_site(web.Application(), str(path))
    assert path.read_text() == "the operator's\n"
