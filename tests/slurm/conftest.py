"""Fixtures of the Slurm tests: one single-node Slurm for the session, started by
scripts/slurm-up.sh in a temporary folder and stopped by scripts/slurm-down.sh; a tiny random Llama
(4 heads over 2 KV heads, 3 layers: tp=2 and pp=2 both split it) and its single-rank answer."""
from __future__ import annotations

import pytest

from tests.slurm.cluster import SlurmCluster, cluster_dir, start_cluster, stop_cluster
from tests.slurm.reference import Reference, single_rank_reference


@pytest.fixture(scope="session")
def slurm() -> SlurmCluster:
    cluster = start_cluster(cluster_dir())
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


@pytest.fixture(scope="session")
def slurm_llama(tmp_path_factory):
    from tests.model_factory import make_random_model
    return make_random_model(tmp_path_factory.mktemp("slurm-model") / "llama", "llama")


@pytest.fixture(scope="session")
def slurm_llama_reference(slurm_llama) -> Reference:
    return single_rank_reference(slurm_llama)
