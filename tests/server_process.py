"""``meshlm serve`` in a subprocess, for the tests that need a real server process (one rank, or
several under mpiexec): its environment, its start-up (it reports the port it got in its log) and
its end."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

_READY = re.compile(r"serving (\S+) on (http://127\.0\.0\.1:\d+)")
_LAUNCHER_VARS = re.compile(r"^(PMI_|PMIX_|OMPI_|MPI_LOCAL|HYDRA_|SLURM_)")


def server_env(**extra: str) -> dict[str, str]:
    """The environment of a server: CPU, and no MPI launcher variables leaking from a parent job."""
    env = {k: v for k, v in os.environ.items() if not _LAUNCHER_VARS.match(k)}
    env.update(MESHLM_DEVICE="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


class ServerProcess:
    """``meshlm serve --port 0 ...`` in its own session; it reports the port it got in its log."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 240.0):
        self.log_path = log_path
        self._log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env=env or server_env(), start_new_session=True)
        try:
            self.model_name, self.base_url = self._wait_until_ready(startup_timeout_s)
        except BaseException:
            self.kill()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_until_ready(self, timeout_s: float) -> tuple[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = _READY.search(self.log())
            if match:
                try:
                    if httpx.get(match.group(2) + "/health", timeout=5).status_code == 200:
                        return match.group(1), match.group(2)
                except httpx.TransportError:
                    pass
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with code {self.proc.returncode}:\n{self.log()[-6000:]}")
            time.sleep(0.2)
        raise AssertionError(f"the server was not ready after {timeout_s:.0f} s:\n{self.log()[-6000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send ``sig`` to the server (or its mpiexec) and return its exit code."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the server did not exit within {timeout_s:.0f} s of "
                                 f"{signal.Signals(sig).name}:\n{self.log()[-6000:]}") from None
        finally:
            self._log_file.close()

    def kill(self) -> None:
        """Kill the server and everything below it (mpiexec's proxy starts its own session)."""
        if self.proc.poll() is None:
            from tests.dist.proc_tree import kill_tree
            kill_tree(self.proc.pid)
            self.proc.wait(timeout=30)
        self._log_file.close()


def serve_argv(model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "meshlm", "serve", "--model", str(model_dir), "--port", "0", *extra]
