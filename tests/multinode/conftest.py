"""Fixtures of the multi-node tests: two simulated hosts (network namespaces, see netns.py), a
two-node Slurm over them (scripts/slurm-up.sh with one slurmd per host), a tiny random Llama and
its single-rank answer."""
from __future__ import annotations

import shutil

import pytest

from tests.multinode.netns import TwoHosts
from tests.slurm.cluster import SlurmCluster, cluster_dir, start_cluster, stop_cluster
from tests.slurm.reference import LONG_PROMPT, Reference, single_rank_reference


@pytest.fixture(scope="session")
def two_hosts() -> TwoHosts:
    root = cluster_dir()
    hosts = None
    try:
        hosts = TwoHosts.create(root)
        yield hosts
    finally:
        if hosts is not None:
            hosts.delete()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def two_node_slurm(two_hosts) -> SlurmCluster:
    nodes = " ".join(f"{h.name}={h.address}" for h in two_hosts.hosts.values())
    cluster = start_cluster(cluster_dir(), exec_prefix=two_hosts.prefix("hosta"), SLURM_NODES=nodes,
                            SLURM_NODE_EXEC=str(two_hosts.on_host_script),
                            # the fresh /sys of a namespace has no cgroup file system to detect
                            SLURM_CGROUP_PLUGIN="cgroup/v1")
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


@pytest.fixture(scope="session")
def multinode_llama(tmp_path_factory):
    from tests.model_factory import make_random_model
    return make_random_model(tmp_path_factory.mktemp("multinode-model") / "llama", "llama")


@pytest.fixture(scope="session")
def multinode_reference(multinode_llama) -> Reference:
    return single_rank_reference(multinode_llama)


@pytest.fixture(scope="session")
def long_prompt_reference(multinode_llama) -> Reference:
    return single_rank_reference(multinode_llama, LONG_PROMPT)
