"""An MPI job under test: launched, its ranks found, signalled, and always cleaned up.

Used by the fault-injection tests (``tests/cli/test_faults.py``) and by ``bench/faults.py``;
:func:`launch` runs a ``dsi-mpi`` command line to its end (the command-line tests).
``mpiexec`` runs in a session of its own (so a test can send it what a terminal's Ctrl-C
sends) with a marker in its environment; every process of the job inherits the marker, so
the job's ranks (``PMI_RANK``) and helpers are found in ``/proc`` without guessing by name.
Hydra starts each rank in a session of its own too, so a signal to mpiexec reaches the ranks
only as mpiexec forwards it (it forwards SIGINT and SIGTERM).

``close()`` never leaves anything behind: it SIGKILLs every process that still carries the
marker (a stopped one too) and removes the MPICH shared-memory segments that the job's own
ranks were seen to map and that no live process maps any more (a rank killed by a test leaves
its segment in /dev/shm, and stale segments can make a later job spin in MPI_Init). Segments
are noted whenever the job's ranks are looked up, and before every signal.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

MPIEXEC = shutil.which("mpiexec")
MARKER = "DSI_TEST_JOB"
SHM = Path("/dev/shm")



def launch(n: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``dsi-mpi ARGS`` on ``n`` ranks under ``mpiexec``, run to its end (bounded)."""
    assert MPIEXEC is not None, "mpiexec not found (pip install mpich)"
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "dsi_mpi", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _shm_of(pids: object) -> set[str]:
    """Names of the /dev/shm files that the processes ``pids`` (all of them: None) map."""
    names = set()
    paths = (
        Path("/proc").glob("[0-9]*/maps")
        if pids is None
        else (Path(f"/proc/{p}/maps") for p in pids)
    )
    for maps in paths:
        try:
            text = maps.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if "/dev/shm/" in line:
                names.add(line.rsplit("/", 1)[1].split()[0])
    return names


class Job:
    """``mpiexec -n N python -m mpi4py -m dsi_mpi ARGS`` with its output in files."""

    def __init__(
        self,
        n: int,
        args: list[str],
        workdir: Path,
        env: dict[str, str] | None = None,
        module: str = "dsi_mpi",
    ) -> None:
        if MPIEXEC is None:
            raise RuntimeError("mpiexec not found (pip install mpich)")
        self.n = n
        self.marker = uuid.uuid4().hex
        self.workdir = Path(workdir)
        self.stdout_path = self.workdir / f"job-{self.marker[:8]}.out"
        self.stderr_path = self.workdir / f"job-{self.marker[:8]}.err"
        self._shm: set[str] = set()  # MPICH segments the job's ranks map (removed by close)
        full_env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        full_env[MARKER] = self.marker
        cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", module, *args]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, env=full_env, cwd=self.workdir, start_new_session=True
            )
        self.started = time.monotonic()
        self.returncode: int | None = None
        self.ended: float | None = None  # when mpiexec exited (monotonic)

    # ------------------------------------------------------------------ processes

    def processes(self) -> dict[int, dict[str, str]]:
        """Every live process of the job (mpiexec, its proxy, the ranks): pid -> environment."""
        out = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                env = _environ(int(entry.name))
                if env.get(MARKER) == self.marker and _alive(int(entry.name)):
                    out[int(entry.name)] = env
        return out

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the live ranks (and notes the shared memory they map)."""
        ranks = {
            int(env["PMI_RANK"]): pid for pid, env in self.processes().items() if "PMI_RANK" in env
        }
        self._shm |= {name for name in _shm_of(ranks.values()) if name.startswith("mpich_shm_")}
        return ranks

    def wait_for_ranks(self, timeout_s: float = 60.0) -> dict[int, int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ranks = self.ranks()
            if len(ranks) == self.n:
                return ranks
            if self.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(
            f"the job's {self.n} ranks did not all start: {self.ranks()}; {self.stderr()[-2000:]}"
        )

    # ------------------------------------------------------------------ faults

    def signal_rank(self, rank: int, sig: int) -> None:
        os.kill(self.wait_for_ranks()[rank], sig)

    def signal_launcher(self, sig: int) -> None:
        """What a terminal's Ctrl-C (SIGINT) or a ``kill`` of mpiexec does."""
        self.ranks()
        os.killpg(self.proc.pid, sig)

    def signal_all(self, sig: int) -> None:
        """Every process of the job at once, as Slurm does at a time limit."""
        self.ranks()
        for pid in self.processes():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ waiting

    def poll(self) -> int | None:
        if self.returncode is None:
            code = self.proc.poll()
            if code is not None:
                self.returncode, self.ended = code, time.monotonic()
        return self.returncode

    def wait(self, timeout_s: float) -> int | None:
        """mpiexec's exit code, or None if it still runs after ``timeout_s``."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        return self.poll()

    def wait_gone(self, timeout_s: float) -> float | None:
        """Wait until no process of the job is left; when that was (monotonic), or None."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll()
            if not self.processes():
                return time.monotonic()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    # ------------------------------------------------------------------ cleanup

    def close(self) -> None:
        """Kill whatever is left of the job, reap mpiexec, remove its stale shared memory."""
        if self.poll() is None:
            self.ranks()
        for _ in range(50):
            left = self.processes()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.poll()
        if self._shm:
            for name in self._shm - _shm_of(None):
                try:
                    (SHM / name).unlink()
                except OSError:
                    pass

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
