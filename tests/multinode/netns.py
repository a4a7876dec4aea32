"""Two hosts on one machine: network namespaces joined by a veth pair, each with its own address.

    hosts = TwoHosts.create(root)       # hosta 10.77.0.1, hostb 10.77.0.2, interface meshlm0 on both
    hosts.on("hosta", ["hostname"])     # run a command "on" a host: its namespace, its own hostname
    hosts.rx_bytes("hostb")             # bytes that arrived over the link
    hosts.delete()

The namespaces see each other only through the veth link (each has its own loopback), so whatever
two ranks on different hosts exchange over TCP crosses it. ``on_host.sh HOST CMD...`` (written
into ``root``) is the "remote shell" of these hosts: hydra's ``-launcher-exec`` and slurm-up.sh's
``SLURM_NODE_EXEC`` call it. Every command runs in a fresh UTS namespace with the host's name, so
``hostname`` and MPI's processor name differ per host. Processes still share the kernel, /tmp and
/dev/shm: MPI transports that look for a same-machine shortcut must be told to use TCP
(``UCX_TLS=tcp,self``), which a real cluster would not need.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

IFNAME = "meshlm0"  # the same name on both hosts, as on a uniform cluster
SUBNET_PREFIX = "10.77.0"
# Ranks on different simulated hosts still share a kernel, and UCX (MPICH's network module) would
# find a same-machine path between them; on a real cluster it picks the network by itself. Only
# TCP over the hosts' link is allowed here, as between real nodes without InfiniBand.
CROSS_HOST_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": IFNAME}


@dataclass(frozen=True, slots=True)
class Host:
    name: str  # hostname inside its UTS namespace, and Slurm node name
    address: str
    netns: str


class TwoHosts:
    def __init__(self, root: Path, hosts: list[Host]):
        self.root = root
        self.hosts = {h.name: h for h in hosts}
        self.on_host_script = root / "on_host.sh"

    # --- creation ----------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path) -> "TwoHosts":
        """Namespaces meshlm-<pid>-a/b, the veth pair between them, addresses, the on_host script.

        Skips the test when namespaces cannot be made here (no ``ip``, not root, no permission).
        """
        _require_namespaces()
        tag = str(os.getpid())
        hosts = [Host("hosta", f"{SUBNET_PREFIX}.1", f"meshlm-{tag}-a"),
                 Host("hostb", f"{SUBNET_PREFIX}.2", f"meshlm-{tag}-b")]
        self = cls(root, hosts)
        try:
            self._build_network(tag)
        except subprocess.CalledProcessError as exc:
            self.delete()
            pytest.skip(f"cannot build the namespace network here: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
        self._write_on_host_script()
        return self

    def _build_network(self, tag: str) -> None:
        a, b = self.hosts["hosta"], self.hosts["hostb"]
        ends = {a.name: f"mlv{tag[-8:]}a", b.name: f"mlv{tag[-8:]}b"}  # <= 15 characters
        for host in (a, b):
            _ip("netns", "add", host.netns)
        _ip("link", "add", ends[a.name], "type", "veth", "peer", "name", ends[b.name])
        for host in (a, b):
            _ip("link", "set", ends[host.name], "netns", host.netns)
            _ip("-n", host.netns, "link", "set", ends[host.name], "name", IFNAME)
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", IFNAME)
            _ip("-n", host.netns, "link", "set", IFNAME, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")

    def _write_on_host_script(self) -> None:
        cases = "\n".join(f"  {h.name}|{h.address}) ns={h.netns} name={h.name} ;;" for h in self.hosts.values())
        self.on_host_script.write_text(f"""#!/bin/sh
# on_host.sh HOST CMD...: run CMD on a simulated host (its network namespace, its own hostname).
# Like ssh, the command is one shell line, so hydra's quoted proxy command works as it is.
host=$1; shift
case $host in
{cases}
  *) echo "on_host.sh: unknown host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c "hostname $name && exec $*"
""")
        self.on_host_script.chmod(0o755)

    def delete(self) -> None:
        """Remove both namespaces; the veth pair goes with them."""
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)

    # --- use ---------------------------------------------------------------------------------
    def prefix(self, name: str) -> list[str]:
        """The command prefix that runs a shell line on host ``name`` (quote it, as for ssh)."""
        return [str(self.on_host_script), name]

    def command(self, name: str, cmd: list[str]) -> list[str]:
        """``cmd`` to run on host ``name``, its arguments quoted into one shell line."""
        return [*self.prefix(name), shlex.join(cmd)]

    def on(self, name: str, cmd: list[str], timeout_s: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(name, cmd), capture_output=True, text=True, timeout=timeout_s, **kw)

    def rx_bytes(self, name: str) -> int:
        """Bytes received so far on the host's end of the link."""
        out = subprocess.run(["ip", "netns", "exec", self.hosts[name].netns, "cat",
                              f"/sys/class/net/{IFNAME}/statistics/rx_bytes"],
                             capture_output=True, text=True, timeout=30, check=True)
        return int(out.stdout)

    def exists(self) -> bool:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        return any(h.netns in listed for h in self.hosts.values())


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _require_namespaces() -> None:
    if shutil.which("ip") is None:
        _install_iproute2()
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"no `{tool}` command here (packages iproute2, util-linux)")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")


def _install_iproute2() -> None:
    """``apt-get install iproute2`` (root only); leaves the skip to the caller when it fails."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "iproute2"],
                   capture_output=True, timeout=300, env=env)
