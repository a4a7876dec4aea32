"""Every rank's lifeline to rank 0: who died, who stopped answering, who has not arrived.

Why it looks like this:

- MPI launchers end a job fast when one process dies: MPICH's hydra SIGKILLs every other rank
  within tens of milliseconds and its message names a pid that need not be the dead one. So the
  news has to come from a rank that is still alive, before the launcher gets there, and without
  MPI (a collective with a dead peer never returns).
- When the world starts, every rank opens one TCP connection to rank 0 (on the loopback address
  when all ranks share a host). Rank 0 offers its host name and then its interfaces' IPv4
  addresses, since compute nodes often cannot resolve each other's names; a rank takes the first
  that answers rank 0's greeting (an address that some other host also has, as a container bridge,
  leads nowhere else by mistake). When a process dies for any reason (SIGKILL, the OOM killer, a
  crash), its kernel closes the connection at once, before its parent hears of the death. Rank
  0's monitor thread sees the stream end and prints ``rank R (host H, pid P) died``, then aborts
  the job; rank 1 watches rank 0 the same way. A rank that exits normally says goodbye first, and
  a rank that aborts the job says so first, so neither is reported as a death.
- Every HEARTBEAT_S each rank sends rank 0 its progress (how many phases it has begun: set-up,
  loading, steps; and whether it is inside one), and rank 0 sends back its own. When a phase
  overruns its timeout, the watchdog asks ``describe_stall`` who is missing: a rank not heard of
  for SILENT_S stopped answering (on the same host the kernel also says whether it is stopped by
  a signal), a rank whose count is behind has not arrived.
- The thread makes no MPI call and writes its report with one ``os.write``, so neither a stuck
  collective nor a held stream lock can keep it quiet.
- Without hydra's clean-up (``-disable-auto-cleanup``, which meshlm's relaunch passes so that the
  report above comes first), hydra takes every rank's exit for a death, even after MPI_Finalize:
  it signals every other host's proxy, and a proxy whose ranks have all just ended has closed its
  socket, so mpiexec fails on the write (``unable to send SIGUSR1 downstream``) and the job ends
  with 255 although every rank exited cleanly. So under that launch (MESHLM_ORDERED_EXIT) ranks on
  several hosts leave in order at a normal end: all finalize MPI, then rank 0 lets one host's ranks
  go at a time, waits until their lifelines close (the processes are gone) and hydra has had
  EXIT_MARGIN_S to take their exit, and leaves last with the ranks of its own host.
"""
from __future__ import annotations

import atexit
import fcntl
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from meshlm.launcher import env
from meshlm.launcher.mpi_json import bcast_json
from meshlm.launcher.ranks import RankInfo, all_on_one_host, process_state

log = logging.getLogger("meshlm")

HEARTBEAT_S = 0.5
SILENT_S = 2.0  # no heartbeat for this long: the rank stopped answering
CONNECT_TIMEOUT_S = 30.0
ADDRESS_TRY_S = 5.0  # one of rank 0's addresses, before the next is tried
_WELCOME = b"welcome\n"
_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address
EXIT_MARGIN_S = 0.2  # ordered exit: a host's ranks are gone; hydra's proxy reports it upstream
LEAVE_WAIT_S = 30.0  # ordered exit: the longest a rank waits for its turn, or for a host to go
_SWITCH_INTERVAL_S = 0.001


@dataclass(slots=True)
class Progress:
    index: int = 0  # phases begun; every rank begins the same phases in the same order
    name: str = "start-up"
    inside: bool = False
    heard: float = field(default_factory=time.monotonic)

    def line(self) -> bytes:
        return f"beat {self.index} {int(self.inside)} {self.name}\n".encode()


class RankMonitor:
    """This rank's end of the lifelines (rank 0: one per peer; others: one to rank 0)."""

    def __init__(self, table: tuple[RankInfo, ...], rank: int, on_death: Callable[[], None]):
        self.table, self.rank = table, rank
        self.me = Progress()
        self.peers: dict[int, Progress] = {}
        self._conns: dict[socket.socket, int] = {}
        self._pending: dict[socket.socket, bytes] = {}
        self._leaving: set[int] = set()  # said goodbye, or announced that it aborts the job
        self._gone: set[int] = set()
        self._go = threading.Event()  # ordered exit: rank 0 let this rank leave, or is gone
        self._on_death = on_death
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def start(cls, comm, table: tuple[RankInfo, ...], on_death: Callable[[], None]) -> "RankMonitor":
        """Collective over ``comm``: rank 0 listens, every other rank connects to it."""
        monitor = cls(table, comm.Get_rank(), on_death)
        one_host = all_on_one_host(table)
        server = None
        offer = None
        if monitor.rank == 0:
            server = socket.create_server(("127.0.0.1" if one_host else "", 0))
            hosts = ["127.0.0.1"] if one_host else [table[0].host, *interface_addresses()]
            offer = {"hosts": hosts, "port": server.getsockname()[1]}
        offer = bcast_json(comm, offer)
        try:
            if server:
                monitor._accept(server, len(table) - 1)
            else:
                monitor._connect(offer["hosts"], offer["port"])
        except OSError as exc:
            log.warning("rank %d: no lifeline to rank 0 (%s); a dead rank is then named only by "
                        "the MPI launcher", monitor.rank, exc)
        # The report races the launcher's teardown (tens of ms): let the thread get the GIL sooner.
        sys.setswitchinterval(min(sys.getswitchinterval(), _SWITCH_INTERVAL_S))
        threading.Thread(target=monitor._run, name="meshlm-monitor", daemon=True).start()
        atexit.register(monitor.close)
        return monitor

    def _accept(self, server: socket.socket, num_peers: int) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        try:
            while len(self._conns) < num_peers:
                server.settimeout(max(0.01, deadline - time.monotonic()))
                conn, _ = server.accept()
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                hello = conn.recv(64).split(b"\n")[0].split()
                if len(hello) != 2 or hello[0] != b"hello":
                    conn.close()  # not one of ours
                    continue
                conn.sendall(_WELCOME)
                self._add(conn, int(hello[1]))
        finally:
            server.close()

    def _connect(self, hosts: list[str], port: int) -> None:
        """Connect to the first of rank 0's ``hosts`` that answers as rank 0; raises naming each failure."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        failures = []
        for host in hosts:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                conn = socket.create_connection((host, port), timeout=min(ADDRESS_TRY_S, left))
            except OSError as exc:
                failures.append(f"{host}: {exc}")
                continue
            try:
                conn.sendall(f"hello {self.rank}\n".encode())
                if _read_line(conn, len(_WELCOME)) == _WELCOME:
                    self._add(conn, 0)
                    return
                failures.append(f"{host}: not rank 0")
            except OSError as exc:
                failures.append(f"{host}: {exc}")
            conn.close()
        raise OSError("; ".join(failures) or "timed out")

    def _add(self, conn: socket.socket, peer: int) -> None:
        conn.setblocking(False)
        self._conns[conn] = peer
        self._pending[conn] = b""
        self.peers[peer] = Progress()

    # --- this rank's progress (the watchdogs call these) ----------------------------------------
    def begin(self, name: str) -> int:
        """This rank enters a phase; returns the phase's index."""
        with self._lock:
            self.me.index += 1
            self.me.name, self.me.inside = name, True
            return self.me.index

    def end(self) -> None:
        with self._lock:
            self.me.inside = False

    # --- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        next_beat = 0.0
        while not self._closed and self._conns:
            if time.monotonic() >= next_beat:
                with self._lock:
                    self._send_all(self.me.line())
                next_beat = time.monotonic() + HEARTBEAT_S
            try:
                ready, _, _ = select.select(list(self._conns), [], [], HEARTBEAT_S)
            except (OSError, ValueError):  # closed under us at exit
                return
            ended = [peer for peer in map(self._read, ready) if peer is not None]
            dead = [peer for peer in ended if peer not in self._leaving]
            if dead and not self._closed and (self.rank == 0 or self.rank == 1):
                self._report_deaths(dead)
                return

    def _read(self, conn: socket.socket) -> int | None:
        """Take in what ``conn`` sent; returns its peer's rank when the peer has gone."""
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        peer = self._conns[conn]
        if not data:
            del self._conns[conn]
            self._gone.add(peer)
            conn.close()
            if peer == 0:
                self._go.set()
            return peer
        *lines, self._pending[conn] = (self._pending[conn] + data).split(b"\n")
        for line in lines:
            self._take(peer, line.decode(errors="replace"))
        return None

    def _take(self, peer: int, line: str) -> None:
        if line in ("bye", "abort"):
            self._leaving.add(peer)
            return
        if line == "go":
            self._go.set()
            return
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[0] == "beat":
            with self._lock:
                self.peers[peer] = Progress(int(parts[1]), parts[3], parts[2] == "1")

    def _send_all(self, data: bytes) -> None:
        for conn in list(self._conns):
            try:
                conn.send(data)
            except (BlockingIOError, OSError):
                pass  # a stopped peer's buffer is full, or it is gone: the reader will see

    def _report_deaths(self, dead: list[int]) -> None:
        self.announce_abort()  # so that no peer reports this rank when the launcher ends it
        text = "".join(f"[meshlm rank {self.rank}] {self.table[peer]} died; aborting all "
                       f"{len(self.table)} ranks\n" for peer in dead)
        os.write(2, text.encode())
        self._on_death()

    # --- what the others ask ----------------------------------------------------------------
    def announce_abort(self) -> None:
        """Tell the peers that this rank is about to abort the job (its end is not a death)."""
        self._send_all(b"abort\n")

    def close(self) -> None:
        """A normal exit: say goodbye, so that the peers do not report this rank as dead; under
        MESHLM_ORDERED_EXIT on several hosts, leave in order (see the module's docstring)."""
        if self._closed:
            return
        ordered = (env.get("MESHLM_ORDERED_EXIT") == "1" and not all_on_one_host(self.table)
                   and bool(self._conns))
        if ordered:
            _finalize_mpi()
        self._send_all(b"bye\n")
        if ordered:
            self._leave_in_order()
        self._closed = True
        for conn in list(self._conns):
            conn.close()

    def _leave_in_order(self) -> None:
        if self.rank != 0:
            self._go.wait(LEAVE_WAIT_S)
            return
        by_host: dict[str, list[int]] = {}
        for info in self.table[1:]:
            by_host.setdefault(info.host, []).append(info.rank)
        own = by_host.pop(self.table[0].host, [])
        for ranks in by_host.values():
            self._send_to(ranks, b"go\n")
            waited_for = set(ranks) & set(self.peers)  # those whose lifeline connected
            deadline = time.monotonic() + LEAVE_WAIT_S
            while not waited_for <= self._gone and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(EXIT_MARGIN_S)
        self._send_to(own, b"go\n")

    def _send_to(self, ranks: list[int], data: bytes) -> None:
        with self._lock:
            for conn, peer in list(self._conns.items()):
                if peer in ranks:
                    try:
                        conn.send(data)
                    except OSError:
                        pass  # gone: nothing to let go

    def is_answering(self, peer: int) -> bool:
        with self._lock:
            progress = self.peers.get(peer)
        return (progress is not None and peer not in self._gone
                and time.monotonic() - progress.heard < SILENT_S)

    def describe_stall(self, index: int, name: str) -> list[str]:
        """Lines naming the ranks that keep phase ``index`` (``name``) from finishing, as far as
        this rank can tell (rank 0 knows every rank; the others know rank 0)."""
        now = time.monotonic()
        with self._lock:
            peers = {peer: Progress(p.index, p.name, p.inside, p.heard) for peer, p in self.peers.items()}
            everyone = {**peers, self.rank: Progress(self.me.index, self.me.name, self.me.inside, now)}
        lines = []
        for peer, progress in sorted(peers.items()):
            info = self.table[peer]
            if peer in self._gone:
                lines.append(f"{info} is gone")
            elif now - progress.heard > SILENT_S:
                lines.append(f"{info} stopped answering{self._stopped_hint(info)}: nothing heard "
                             f"from it for {now - progress.heard:.1f} s")
            elif progress.index < index:
                where = "inside" if progress.inside else "after"
                lines.append(f"{info} has not arrived at {name}: it is {where} {progress.name}")
        if lines:
            return lines
        inside = [peer for peer, p in sorted(everyone.items()) if p.index == index and p.inside]
        if len(everyone) == len(self.table) and 0 < len(inside) < len(everyone):
            return [f"{self.table[peer]} is still inside {name}" for peer in inside]
        return [f"every rank this one hears from is inside {name}: a collective in it stalled "
                "or a rank is still computing"]

    def _stopped_hint(self, info: RankInfo) -> str:
        if info.host != self.table[self.rank].host:
            return ""
        state = process_state(info.pid)
        return " (stopped by a signal)" if state in ("T", "t") else ""


def _finalize_mpi() -> None:
    """MPI_Finalize now (collective: every rank waits for all), before the ranks leave in order;
    mpi4py's own finalization at exit then has nothing left to do."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def interface_addresses() -> list[str]:
    """This host's IPv4 addresses outside the loopback, one per interface that has one (Linux)."""
    addresses = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # down, or no IPv4 address
            address = socket.inet_ntoa(reply[20:24])
            if not address.startswith("127.") and address not in addresses:
                addresses.append(address)
    return addresses


def _read_line(conn: socket.socket, limit: int) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data
