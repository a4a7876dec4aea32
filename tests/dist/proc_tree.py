"""The processes below a given one, read from /proc (Linux): mpiexec, its proxy and the ranks.

Hydra's proxy starts its own session, so a process group or session kill does not reach the
ranks; walking the parent links does.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state letter, command line) for every process we may read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis.
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        table[int(entry.name)] = (int(ppid), state, cmdline.replace(b"\0", b" ").decode(errors="replace").strip())
    return table


def descendants(root: int) -> list[dict]:
    """Every live process below ``root``, as ``{"pid", "cmdline"}``, parents before children."""
    table = _table()
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop(0)
        children = sorted(pid for pid, (ppid, _, _) in table.items() if ppid == parent)
        found += [{"pid": pid, "cmdline": table[pid][2]} for pid in children]
        frontier += children
    return found


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still exist and are not zombies."""
    table = _table()
    return [pid for pid in pids if pid in table and table[pid][1] != "Z"]


def wait_until_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    """Poll until none of ``pids`` is alive; returns those still alive after ``timeout_s``.

    A killed rank takes a moment to release its memory after its launcher has exited.
    """
    deadline = time.monotonic() + timeout_s
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and everything below it (children first found, then killed together)."""
    for proc in [*descendants(root), {"pid": root}]:
        try:
            os.kill(proc["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
