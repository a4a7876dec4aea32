"""slurm/serve.sbatch on a real single-node Slurm: the server that rank 0 starts answers over
HTTP with the single-rank run's text, at the URL the job prints; scancel then ends every rank."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.slurm.cluster import free_port, job_processes, wait_for
from tests.slurm.reference import MAX_TOKENS, PROMPT

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MESHLM = Path(sys.executable).parent / "meshlm"
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not MESHLM.exists(), reason=f"no meshlm command beside {sys.executable}")]

SERVE_ARGS = "--served-model-name tiny --max-model-len 256 --num-kv-blocks 64"
_URL = re.compile(r"meshlm-slurm: serving at (http://\S+/v1) ")


def serve_env(model_dir: Path, port: int) -> dict[str, str]:
    return {"MESHLM": str(MESHLM), "MESHLM_MODEL": str(model_dir), "MESHLM_PORT": str(port),
            "MESHLM_ARGS": SERVE_ARGS, "MESHLM_DEVICE": "cpu"}


def wait_until_healthy(slurm, job, base_url: str, timeout_s: float) -> None:
    def healthy() -> bool:
        assert slurm.is_queued(job), f"the serve job ended before it answered:\n{job.log()}"
        try:
            return httpx.get(base_url.removesuffix("/v1") + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False
    assert wait_for(healthy, timeout_s, interval_s=0.5), f"no answer from {base_url} in {timeout_s} s\n{job.log()}"


def meshlm_ranks(job_id: int) -> list[int]:
    """The job's processes that run ``meshlm serve`` (the srun tasks)."""
    ranks = []
    for pid in job_processes(job_id):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        is_srun = cmdline[0].rsplit(b"/", 1)[-1] == b"srun"  # srun's own command line names meshlm too
        if not is_srun and b"serve" in cmdline and any(part.endswith(b"meshlm") for part in cmdline):
            ranks.append(pid)
    return ranks


def test_serve_job_answers_then_scancel_ends_every_rank(slurm, slurm_llama, slurm_llama_reference):
    job = slurm.sbatch("serve.sbatch", [], serve_env(slurm_llama, free_port()),
                       ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2"])
    try:
        match = wait_for(lambda: _URL.search(job.stderr()), 60)
        assert match, f"the job printed no URL\n{job.log()}"
        base_url = match.group(1)
        assert base_url.startswith("http://localhost:"), base_url  # the job's first (only) node
        wait_until_healthy(slurm, job, base_url, 180)

        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert out.choices[0].text == slurm_llama_reference.text, job.log()
        assert out.usage.completion_tokens == len(slurm_llama_reference.token_ids)
        assert "[meshlm rank 0 tp 0/2]" in job.stderr(), job.log()  # a world of 2, rank 0 serving
        ranks = meshlm_ranks(job.job_id)
        assert len(ranks) == 2, (ranks, job.log())
    finally:
        slurm.run(["scancel", str(job.job_id)], check=False)
    slurm.wait_until_done(job, 60)
    assert slurm.job_state(job)[0] == "CANCELLED", job.log()
    left = wait_for(lambda: not job_processes(job.job_id), 20)
    assert left, f"processes of job {job.job_id} outlived it: {job_processes(job.job_id)}\n{job.log()}"
    assert "server stopped" in job.stderr(), job.log()  # rank 0 shut down cleanly on SIGTERM
