"""Run untrusted Python in an isolated, limited process: ``run_python(code, stdin, limits)``.

The isolation is built by the kernel before the untrusted interpreter starts, by a trusted
launcher (:mod:`rewards._sandbox_init`, plain ``ctypes`` calls to libc, no extra binaries);
none of it relies on code inside the untrusted interpreter. Layers 1-3 are mandatory and
:func:`isolation` checks each from inside the sandbox once per process:

1. Identity: a user namespace of its own per run. As root, the child runs as the host's
   uid/gid 65534 with no supplementary groups; as another user, as that same user, seen as
   65534 inside a nested user namespace. Every capability set is empty (bounding and ambient
   too), ``no_new_privs`` is set (setuid binaries and file capabilities give nothing), and
   the sandbox's init process is not dumpable (the program cannot ptrace it).
2. Mount namespace: every mount private and made read-only and nosuid recursively with
   ``mount_setattr`` (Linux >= 5.12), so writes outside fail with EROFS whatever the file
   permissions; ``/tmp`` and ``/dev/shm`` are fresh tmpfs mounts of ``tmpfs_mb`` each; the
   work directory ``/tmp/work`` (cwd, HOME, TMPDIR) lives in that ``/tmp`` and disappears
   with the run; ``/dev`` is a tmpfs with only null, zero, full, random, urandom and the std
   stream links; ``/proc`` is a fresh ``subset=pid`` instance of the run's own pid namespace
   (no other process's environ, fds or namespaces; no ``/proc/sys``). When the caller is
   root and a directory above the interpreter is closed to others (a pyenv under ``/root``),
   that directory is covered by a tmpfs that holds only the interpreter's tree, which also
   hides the rest of it.
3. Namespaces: an empty network namespace (a downed loopback: no traffic, no DNS, no
   abstract sockets of the host), a pid namespace whose init waits for the program and whose
   end kills everything left in it (``setsid`` and double forks included), and new IPC, UTS
   and cgroup namespaces.
4. Seccomp, optional, where libseccomp.so.2 can be loaded: mount, namespace (unshare,
   setns, clone with namespace flags), ptrace, bpf, io_uring, keyring, module and similar
   syscalls fail with EPERM; ``clone3`` with ENOSYS so libc falls back to ``clone``.
5. Limits, set in the child before user code: CPU seconds (SIGXCPU, then SIGKILL a second
   later), address space (MemoryError), file size (EFBIG or SIGXFSZ), process count
   (RLIMIT_NPROC, counted per user namespace, so per run; the kernel does not apply it to a
   child whose host uid is 0, which happens only when the caller is root inside a user
   namespace), open files, no core files; a wall-clock timeout after which the whole process
   group is SIGKILLed. Output goes to files, read back truncated to ``max_output_bytes``; the
   environment is minimal (PATH, HOME, TMPDIR, LANG); ``python -I``.
6. An in-interpreter audit hook (:mod:`rewards._sandbox_child`), an extra layer only: native
   code can bypass it, and the tests show layers 1-5 holding with it off.

If a mandatory layer cannot be set up, :func:`run_python` raises :class:`SandboxUnavailable`
naming the layer; it never falls back silently. ``isolate=False`` (the ``code`` reward's
``unsafe_no_isolation``) runs with layers 5 and 6 only, in a host directory: trusted code
only. What stays visible: the rest of the host file system, read-only, with the permissions
of an unprivileged user (or of the calling user, when not root).

:class:`SandboxLimits` fields: ``timeout_s`` (wall clock, includes start-up), ``cpu_s``,
``memory_mb``, ``file_size_mb``, ``nproc``, ``nofile``, ``max_output_bytes``, ``tmpfs_mb``.
:class:`SandboxResult`: ``returncode`` (negative: killed by that signal), ``stdout``,
``stderr``, ``timed_out``, ``duration_s``, ``isolation`` (a label of the layers, ``none``
without), ``pgid``; ``passed`` is exit 0 within the time.
"""

from __future__ import annotations

import errno
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

NOBODY = 65534
SANDBOX_WORK = "/tmp/work"
_HERE = Path(__file__).parent
_CHILD_SOURCE = (_HERE / "_sandbox_child.py").read_text(encoding="utf-8")
_INIT_SOURCE = (_HERE / "_sandbox_init.py").read_text(encoding="utf-8")
_DEV_ENTRIES = {"null", "zero", "full", "random", "urandom", "fd", "stdin", "stdout", "stderr", "shm"}
UNSAFE_HINT = (
    "Run where user namespaces can be created (as root, or with unprivileged user namespaces "
    "enabled, Linux >= 5.12), or, only for completions you trust, set "
    "`params: {unsafe_no_isolation: true}` on the `code` reward (then only resource limits and "
    "an in-process audit hook apply)."
)


class SandboxUnavailable(RuntimeError):
    """A mandatory isolation layer cannot be set up on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    cpu_s: float = 5.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    nproc: int = 32
    nofile: int = 64
    max_output_bytes: int = 64 * 1024
    tmpfs_mb: int = 64


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


@dataclass(frozen=True)
class Isolation:
    """What :func:`isolation` found: ``label`` of the layers, ``problem`` (None when all hold)."""

    label: str
    problem: str | None = None


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


def _child_config(limits: SandboxLimits, guard: bool, isolate: bool) -> str:
    keep = ("cpu_s", "memory_mb", "file_size_mb", "nproc", "nofile")
    cfg = {k: v for k, v in asdict(limits).items() if k in keep}
    cfg["cpu_s"] = max(1, math.ceil(limits.cpu_s))
    writable = ["/tmp", "/dev/shm"] if isolate else []  # private tmpfs mounts when isolated
    return json.dumps({**cfg, "guard": guard, "writable": writable})


def _interpreter_paths(python: str) -> list[str]:
    """Paths the interpreter needs: its binary (as named and resolved) and prefixes (venv and base)."""
    real = os.path.realpath(python)
    named = Path(os.path.abspath(python)).parent
    paths = {real, str(named.parent if (named.parent / "pyvenv.cfg").exists() else named)}
    if real == os.path.realpath(sys.executable):
        paths |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    else:
        paths.add(str(Path(real).parents[1]))
    return sorted({os.path.realpath(p) for p in paths})


def _command(outer: Path, limits: SandboxLimits, guard: bool, isolate: bool, python: str, status_fd: int):
    """(argv, cwd, env) of the process to start."""
    config = _child_config(limits, guard, isolate)
    if not isolate:
        work = outer / "work"
        work.mkdir()
        (outer / "main.py").rename(work / "main.py")
        return [python, "-I", "-c", _CHILD_SOURCE, str(work / "main.py"), config], work, _env(str(work))
    init = {
        "status_fd": status_fd,
        "uid": NOBODY,
        "gid": NOBODY,
        "program": str(outer / "main.py"),
        "work": SANDBOX_WORK,
        "tmpfs_mb": limits.tmpfs_mb,
        "interpreter": _interpreter_paths(python),
        "argv": [python, "-I", "-c", _CHILD_SOURCE, f"{SANDBOX_WORK}/main.py", config],
        "env": _env(SANDBOX_WORK),
    }
    return [python, "-I", "-S", "-c", _INIT_SOURCE, json.dumps(init)], outer, _env(SANDBOX_WORK)


def _status_lines(fd: int) -> list[str]:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").splitlines()


def _execute(cmd, cwd, env, outer: Path, timeout_s: float, status_w: int) -> tuple[int, bool, float, int]:
    """Start ``cmd``; wait up to ``timeout_s``; kill its process group; (rc, timed_out, s, pgid)."""
    start = time.monotonic()
    timed_out = False
    with (
        (outer / "stdin").open("rb") as fin,
        (outer / "out").open("wb") as fout,
        (outer / "err").open("wb") as ferr,
    ):
        proc = subprocess.Popen(
            cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=cwd, env=env, start_new_session=True, pass_fds=(status_w,)
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            rc = proc.wait()
        finally:
            _kill_group(proc.pid)
    return rc, timed_out, time.monotonic() - start, proc.pid


def _run(code: str, stdin: str, limits: SandboxLimits, guard: bool, isolate: bool, python: str):
    """One run: (SandboxResult with an empty label, the launcher's status lines)."""
    outer = Path(tempfile.mkdtemp(prefix="align-sandbox-"))
    status_r, status_w = os.pipe()
    try:
        (outer / "main.py").write_text(code, encoding="utf-8")
        (outer / "stdin").write_text(stdin, encoding="utf-8")
        cmd, cwd, env = _command(outer, limits, guard, isolate, python, status_w)
        rc, timed_out, duration, pgid = _execute(cmd, cwd, env, outer, limits.timeout_s, status_w)
        status = _status_lines(status_r)
        errors = [line[len("error ") :] for line in status if line.startswith("error ")]
        if errors:
            raise SandboxUnavailable(f"sandbox set-up failed: {'; '.join(errors)}. {UNSAFE_HINT}")
        if isolate and 128 < rc < 128 + 65:
            rc = -(rc - 128)
        result = SandboxResult(
            returncode=rc,
            stdout=_read(outer / "out", limits.max_output_bytes),
            stderr=_read(outer / "err", limits.max_output_bytes),
            timed_out=timed_out,
            duration_s=duration,
            isolation="",
            pgid=pgid,
        )
        return result, status
    finally:
        os.close(status_r)
        os.close(status_w)
        shutil.rmtree(outer, ignore_errors=True)


_PROBE = r"""
import json, os, socket, sys
status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines() if ':' in line)
def write(path):
    try:
        open(path, 'w').close()
    except OSError as exc:
        return exc.errno
    os.remove(path)
    return 0
mounts = {}
for line in open('/proc/self/mountinfo'):
    left, right = line.split(' - ')
    mounts[left.split()[4]] = [right.split()[0], left.split()[5].split(',')]
print(json.dumps({
    'ids': [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
    'caps': {k: int(status[k], 16) for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb')},
    'nnp': status['NoNewPrivs'].strip(), 'seccomp': status.get('Seccomp', '0').strip(),
    'writes': {'/': write('/align-probe'), sys.prefix: write(os.path.join(sys.prefix, 'align-probe')),
               'work': write('align-probe')},
    'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
    'caller_visible': os.path.exists('/proc/%d' % CALLER),
    'interfaces': sorted(name for _, name in socket.if_nameindex()),
    'dev': sorted(os.listdir('/dev')),
    'mounts': {m: mounts.get(m) for m in ('/', '/tmp', '/dev/shm', '/proc')},
}))
"""


def _problems(facts: dict) -> list[str]:
    """The mandatory layers the probe found missing, each as '<layer>: <what was seen>'."""
    found = []
    if 0 in facts["ids"]:
        found.append(f"unprivileged identity: uid/euid/gid/egid are {facts['ids']}")
    if any(facts["caps"].values()):
        found.append(f"capabilities: not all dropped {facts['caps']}")
    if facts["nnp"] != "1":
        found.append("no_new_privs: not set")
    for where, err in facts["writes"].items():
        if where != "work" and err != errno.EROFS:
            found.append(f"read-only root: creating a file in {where} gave {errno.errorcode.get(err, err)}, not EROFS")
    if facts["writes"]["work"] != 0:
        found.append(f"work directory: not writable ({errno.errorcode.get(facts['writes']['work'])})")
    mounts = facts["mounts"]
    for where, fstype, opt in (
        ("/", None, "ro"),
        ("/tmp", "tmpfs", "rw"),
        ("/dev/shm", "tmpfs", "rw"),
        ("/proc", "proc", None),
    ):
        seen = mounts.get(where)
        if seen is None or (fstype and seen[0] != fstype) or (opt and opt not in seen[1]):
            found.append(f"mount namespace: {where} is {seen}, expected {fstype or 'any'} {opt or ''}".rstrip())
    if facts["caller_visible"] or len(facts["pids"]) > 3:
        found.append(
            f"fresh /proc: the sandbox sees pids {facts['pids'][:8]} (caller visible: {facts['caller_visible']})"
        )
    if facts["interfaces"] != ["lo"]:
        found.append(f"network namespace: interfaces {facts['interfaces']}")
    extra = sorted(set(facts["dev"]) - _DEV_ENTRIES)
    if extra:
        found.append(f"minimal /dev: also holds {extra[:8]}")
    return found


@functools.lru_cache(maxsize=8)
def isolation(python: str) -> Isolation:
    """Set up every layer once for ``python`` and check from inside that each holds (cached)."""
    if not sys.platform.startswith("linux"):
        return Isolation("none", f"namespaces: the sandbox needs Linux, not {sys.platform}")
    try:
        probe = _PROBE.replace("CALLER", str(os.getpid()))
        result, status = _run(probe, "", SandboxLimits(timeout_s=20, cpu_s=10), False, True, python)
    except SandboxUnavailable as exc:
        return Isolation("none", str(exc).removesuffix(f" {UNSAFE_HINT}"))
    if not result.passed:
        tail = result.stderr.strip()[-500:]
        return Isolation("none", f"the probe program failed in the sandbox (exit {result.returncode}): {tail}")
    facts = json.loads(result.stdout)
    problems = _problems(facts)
    ready = [line.removeprefix("ready ") for line in status if line.startswith("ready ")]
    seccomp = "seccomp" if facts["seccomp"] == "2" else (ready[0] if ready else "seccomp skipped")
    label = f"userns(uid {facts['ids'][0]})+mountns(ro)+pidns+netns+ipcns, no caps, no_new_privs, {seccomp}"
    return Isolation("none" if problems else label, "; ".join(problems) or None)


def require_isolation(python: str | None = None) -> Isolation:
    """:func:`isolation` for ``python`` (default: this interpreter); raise when a layer is missing."""
    found = isolation(python or sys.executable)
    if found.problem:
        raise SandboxUnavailable(
            f"the code sandbox cannot isolate untrusted programs here: {found.problem}. {UNSAFE_HINT}"
        )
    return found


def run_python(
    code: str,
    stdin: str = "",
    limits: SandboxLimits | None = None,
    *,
    guard: bool = True,
    isolate: bool = True,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` as a script in the sandbox.

    ``isolate=False`` drops layers 1-4 (trusted code only); ``guard=False`` drops the audit
    hook (layer 6, for tests). Raises :class:`SandboxUnavailable` when isolation is asked
    for and a mandatory layer cannot be set up.
    """
    limits = limits or SandboxLimits()
    python = python or sys.executable
    label = require_isolation(python).label if isolate else "none"
    result, _ = _run(code, stdin, limits, guard, isolate, python)
    return replace(result, isolation=label)
