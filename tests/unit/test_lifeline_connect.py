"""How a rank reaches rank 0's lifeline when the job spans hosts: rank 0 offers its host name and
its interfaces' addresses; the rank takes the first that answers rank 0's greeting. Real sockets
on this host's loopback addresses, no MPI."""
from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import threading

import pytest

from meshlm.launcher.monitor import RankMonitor, interface_addresses
from meshlm.launcher.ranks import RankInfo

pytestmark = pytest.mark.timeout(60)

TABLE = (RankInfo(0, "hosta", 100), RankInfo(1, "hostb", 101))


def _decoy(address: str, port: int) -> socket.socket:
    """Something else listening on rank 0's port at another address: it answers, but not as rank 0."""
    server = socket.create_server((address, port))

    def serve():
        conn, _ = server.accept()
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_rank_skips_unresolvable_names_and_strangers_and_links_to_rank_0():
    rank0, rank1 = (RankMonitor(TABLE, r, on_death=lambda: None) for r in (0, 1))
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    decoy = _decoy("127.0.0.2", port)
    accepting = threading.Thread(target=rank0._accept, args=(server, 1), daemon=True)
    accepting.start()
    try:
        rank1._connect(["no-such-host.invalid", "127.0.0.2", "127.0.0.1"], port)
        accepting.join(10)
        assert not accepting.is_alive()
        assert set(rank1._conns.values()) == {0} and set(rank0._conns.values()) == {1}
    finally:
        decoy.close()
        for monitor in (rank0, rank1):
            for conn in list(monitor._conns):
                conn.close()


def test_rank_that_reaches_no_address_names_each_failure():
    rank1 = RankMonitor(TABLE, 1, on_death=lambda: None)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more
    with pytest.raises(OSError) as err:
        rank1._connect(["no-such-host.invalid", "127.0.0.1"], port)
    assert "no-such-host.invalid:" in str(err.value) and "127.0.0.1:" in str(err.value)
    assert not rank1._conns


@pytest.mark.skipif(shutil.which("ip") is None, reason="no `ip` command to compare with")
def test_interface_addresses_are_this_hosts_ipv4_addresses_outside_the_loopback():
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    listed = {line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3}
    expected = {a for a in listed if not ipaddress.ip_address(a).is_loopback}
    found = interface_addresses()
    assert len(found) == len(set(found))
    assert set(found) == expected
