"""Run untrusted Python in a separate, limited process: ``run_python(code, stdin, limits)``.

Layers, from the outside in (what each does, honestly):

1. Own process group and session (``start_new_session=True``). On timeout the whole group
   gets SIGKILL; after every run the group is killed again, so children left behind in the
   group do not outlive the call.
2. Namespaces, when ``unshare`` is present and permitted (probed once per process, see
   :func:`isolation`): a new network namespace (no interface but a downed loopback, so no
   traffic leaves) and a new PID namespace whose init is a ``/bin/sh`` that waits for Python:
   when it ends, the kernel kills every process left in the namespace, including ones that
   left the process group with ``setsid``. Processes inside cannot signal anything outside.
   Running as root, the child also drops to uid/gid 65534 (nobody) when that user can run
   the interpreter; then file permissions apply and RLIMIT_NPROC is enforced (the kernel
   ignores RLIMIT_NPROC for root, and counts it per user, threads included). Not root: a
   user namespace is tried as well (RLIMIT_NPROC then counts the caller's own processes).
3. Resource limits set in the child before user code: CPU seconds (SIGXCPU, then SIGKILL a
   second later), address space (MemoryError), file size (writes fail with EFBIG), process
   count (see 2), open files, no core files.
4. An in-interpreter audit hook (:mod:`rewards._sandbox_child`) refusing fork/exec/spawn/
   subprocess, sockets and DNS, ctypes, raising limits, signalling other processes, and writes
   or file-system changes outside the work directory. This is what stops a fork bomb or a
   network call when running as root without namespaces; native code could bypass it.
5. A throwaway work directory (the child's cwd, HOME and TMPDIR), removed afterwards; a
   minimal environment (PATH, HOME, TMPDIR, LANG, plus PWD from the shell); ``python -I`` (no
   user site, no PYTHON* variables); stdin from a file; stdout/stderr to files, read back
   truncated to ``max_output_bytes`` each.

This is not a container: files outside the work directory stay readable, and without
namespaces and the uid drop a determined attacker with native code gets out of layer 4.
Run training in a container (with a pids cgroup limit) for real isolation.

:class:`SandboxLimits` fields: ``timeout_s`` (wall clock, includes interpreter start),
``cpu_s``, ``memory_mb``, ``file_size_mb``, ``nproc``, ``nofile``, ``max_output_bytes``.
:class:`SandboxResult`: ``returncode`` (negative: killed by that signal, also when the shell
of layer 2 reported it as 128+N), ``stdout``, ``stderr``, ``timed_out``, ``duration_s``,
``isolation`` (which of layer 2 applied), ``pgid``; ``passed`` is exit 0 within the time.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

NOBODY = 65534
_CHILD_SOURCE = (Path(__file__).with_name("_sandbox_child.py")).read_text(encoding="utf-8")
_SH_WAIT = '"$@"; exit $?'


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    cpu_s: float = 5.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    nproc: int = 32
    nofile: int = 64
    max_output_bytes: int = 64 * 1024


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    isolation: str
    pgid: int

    @property
    def passed(self) -> bool:
        """True when the program exited with status 0 within the time limit."""
        return self.returncode == 0 and not self.timed_out


def _probe(prefix: list[str], python: str) -> bool:
    outer = Path(tempfile.mkdtemp(prefix="align-sandbox-probe-"))
    try:
        work = _prepare(outer, "pass\n", "", "--setuid" in prefix)
        cmd = [*prefix, "/bin/sh", "-c", _SH_WAIT, "sh", python, "-I", str(work / "main.py")]
        done = subprocess.run(
            cmd, cwd=work, env=_env(str(work)), capture_output=True, timeout=10, start_new_session=True
        )
        return done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(outer, ignore_errors=True)


@functools.lru_cache(maxsize=8)
def isolation(python: str) -> tuple[str, tuple[str, ...]]:
    """(label, command prefix) of the strongest namespace setup that works for ``python``."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return "none", ()
    base = [unshare, "--net", "--pid", "--fork", "--kill-child"]
    candidates = []
    if os.geteuid() == 0:
        drop = ["--setuid", str(NOBODY), "--setgid", str(NOBODY)]
        candidates += [("netns+pidns+nobody", base + drop), ("netns+pidns", base)]
    else:
        candidates += [("userns+netns+pidns", [unshare, "--user", "--map-root-user", *base[1:]])]
    for label, prefix in candidates:
        if _probe(prefix, python):
            return label, tuple(prefix)
    return "none", ()


def _env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path, limit: int) -> str:
    size = path.stat().st_size
    with path.open("rb") as f:
        data = f.read(limit)
    text = data.decode("utf-8", errors="replace")
    return text + f"\n[... truncated: {size} bytes in total]" if size > limit else text


def _prepare(outer: Path, code: str, stdin: str, drop_uid: bool) -> Path:
    work = outer / "work"
    work.mkdir()
    (work / "main.py").write_text(code, encoding="utf-8")
    (outer / "stdin").write_text(stdin, encoding="utf-8")
    if drop_uid:
        outer.chmod(0o711)
        os.chown(work, NOBODY, NOBODY)
    return work


def _child_config(limits: SandboxLimits, guard: bool) -> str:
    cfg = {k: v for k, v in asdict(limits).items() if k not in ("timeout_s", "max_output_bytes")}
    cfg["cpu_s"] = max(1, math.ceil(limits.cpu_s))
    return json.dumps({**cfg, "guard": guard})


def _returncode(rc: int, wrapped: bool) -> int:
    return -(rc - 128) if wrapped and 128 < rc < 128 + 65 else rc


def run_python(
    code: str,
    stdin: str = "",
    limits: SandboxLimits | None = None,
    *,
    guard: bool = True,
    isolate: bool = True,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` as a script in the sandbox; ``guard``/``isolate`` turn layers 4/2 off (for tests)."""
    limits = limits or SandboxLimits()
    python = python or sys.executable
    label, prefix = isolation(python) if isolate else ("none", ())
    wrapper = [*prefix, "/bin/sh", "-c", _SH_WAIT, "sh"] if prefix else []
    outer = Path(tempfile.mkdtemp(prefix="align-sandbox-"))
    try:
        work = _prepare(outer, code, stdin, "--setuid" in prefix)
        cmd = [
            *wrapper,
            python,
            "-I",
            "-c",
            _CHILD_SOURCE,
            str(work / "main.py"),
            _child_config(limits, guard),
        ]
        start = time.monotonic()
        timed_out = False
        with (
            (outer / "stdin").open("rb") as fin,
            (outer / "out").open("wb") as fout,
            (outer / "err").open("wb") as ferr,
        ):
            proc = subprocess.Popen(
                cmd,
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                cwd=work,
                env=_env(str(work)),
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                rc = proc.wait()
            finally:
                _kill_group(proc.pid)
        duration = time.monotonic() - start
        return SandboxResult(
            returncode=_returncode(rc, bool(prefix)),
            stdout=_read(outer / "out", limits.max_output_bytes),
            stderr=_read(outer / "err", limits.max_output_bytes),
            timed_out=timed_out,
            duration_s=duration,
            isolation=label,
            pgid=proc.pid,
        )
    finally:
        shutil.rmtree(outer, ignore_errors=True)
