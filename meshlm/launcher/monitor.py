"""Every rank's lifeline to rank 0: who died, who stopped answering, who has not arrived.

Why it looks like this:

- MPI launchers end a job fast when one process dies: MPICH's hydra SIGKILLs every other rank
  within tens of milliseconds and its message names a pid that need not be the dead one. So the
  news has to come from a rank that is still alive, before the launcher gets there, and without
  MPI (a collective with a dead peer never returns).
- When the world starts, every rank opens one TCP connection to rank 0 (on the loopback address
  when all ranks share a host). When a process dies for any reason (SIGKILL, the OOM killer, a
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
"""
from __future__ import annotations

import atexit
import logging
import os
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from meshlm.launcher.mpi_json import bcast_json
from meshlm.launcher.ranks import RankInfo, all_on_one_host, process_state

log = logging.getLogger("meshlm")

HEARTBEAT_S = 0.5
SILENT_S = 2.0  # no heartbeat for this long: the rank stopped answering
CONNECT_TIMEOUT_S = 30.0
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
        self._on_death = on_death
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def start(cls, comm, table: tuple[RankInfo, ...], on_death: Callable[[], None]) -> "RankMonitor":
        """Collective over ``comm``: rank 0 listens, every other rank connects to it."""
        monitor = cls(table, comm.Get_rank(), on_death)
        one_host = all_on_one_host(table)
        server = None
        if monitor.rank == 0:
            server = socket.create_server(("127.0.0.1" if one_host else "", 0))
            address = ("127.0.0.1" if one_host else table[0].host, server.getsockname()[1])
        host, port = bcast_json(comm, list(address) if server else None)
        address = (host, port)
        try:
            if server:
                monitor._accept(server, len(table) - 1)
            else:
                monitor._connect(address)
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
                self._add(conn, int(hello[1]))
        finally:
            server.close()

    def _connect(self, address: tuple[str, int]) -> None:
        conn = socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)
        conn.sendall(f"hello {self.rank}\n".encode())
        self._add(conn, 0)

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
            return peer
        *lines, self._pending[conn] = (self._pending[conn] + data).split(b"\n")
        for line in lines:
            self._take(peer, line.decode(errors="replace"))
        return None

    def _take(self, peer: int, line: str) -> None:
        if line in ("bye", "abort"):
            self._leaving.add(peer)
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
        """A normal exit: say goodbye, so that the peers do not report this rank as dead."""
        if self._closed:
            return
        self._closed = True
        self._send_all(b"bye\n")
        for conn in list(self._conns):
            conn.close()

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
