"""The sandbox against hostile programs, as root and as a non-root uid; limits are small so the file stays fast.

Nothing here skips: where the isolation cannot be set up, these tests fail.
"""

import ctypes.util
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from rewards import RewardConfigError, build_rewards, sandbox
from rewards.code_exec import UnsafeSandboxWarning, code_reward
from rewards.sandbox import Isolation, SandboxLimits, SandboxUnavailable, run_python
from tests.rewards import sandbox_attacks

FAST = SandboxLimits(timeout_s=3.0, cpu_s=1, memory_mb=256, nproc=16)
ROOT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Attacks that must succeed when run with no sandbox at all (the others would harm the host).
ESCAPES = [
    "posixsubprocess_shell_writes_outside", "nsenter_host_network", "sqlite_outside", "mkfifo_outside",
    "mknod_outside", "setxattr_outside", "shm_open_host", "trainer_environ", "network_connect", "write_outside",
]  # fmt: skip


def _processes() -> list[tuple[int, list[str]]]:
    """(pid, stat fields after the command name) of every live process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            found.append((int(entry), fields))
    return found


def _group_gone(pgid: int, wait_s: float = 2.0) -> bool:
    deadline = time.monotonic() + wait_s
    while any(int(fields[2]) == pgid for _, fields in _processes()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _our_children(ignore: tuple[int, ...] = ()) -> list[int]:
    me = str(os.getpid())
    return [pid for pid, fields in _processes() if fields[1] == me and pid not in ignore]


def _with(marker: str) -> list[int]:
    """Pids whose command line contains ``marker``."""
    pids = []
    for pid, _ in _processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(pid)
        except OSError:
            continue
    return pids


def _new_shm_entries(before: set[str], shm_name: str) -> list[str]:
    """Entries added to the host's /dev/shm by a sandbox: our name, or owned by the sandbox uid.

    (Other programs on a shared machine may add theirs meanwhile; those are not counted.)
    """
    found = []
    for name in set(os.listdir("/dev/shm")) - before:
        try:
            owner = os.stat(f"/dev/shm/{name}").st_uid
        except FileNotFoundError:
            continue
        if shm_name in name or owner == sandbox.NOBODY:
            found.append(name)
    return found


def _sandbox_dirs() -> set[str]:
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("align-sandbox-")}


@pytest.fixture(autouse=True)
def healthy_afterwards():
    yield
    assert _our_children() == []
    assert run_python("print(6 * 7)", limits=FAST).stdout == "42\n"


@dataclass
class Arena:
    """What the attacks aim at: a world-writable directory outside the work directory (not under
    /tmp), a loopback listener in the caller's network namespace, a stand-in trainer process with
    a secret in its environment, a marker in the host's /dev/shm, a nonce for detached processes."""

    cfg: dict
    listener: socket.socket
    decoy: subprocess.Popen
    shm_before: set[str] = field(default_factory=set)
    dirs_before: set[str] = field(default_factory=set)

    def accepted(self) -> bool:
        try:
            self.listener.accept()[0].close()
            return True
        except BlockingIOError:
            return False

    def assert_untouched(self) -> None:
        target = self.cfg["target"]
        assert sorted(os.listdir(target)) == ["existing"]
        assert os.listxattr(os.path.join(target, "existing")) == []
        assert not self.accepted(), "a sandboxed program reached the caller's loopback listener"
        assert self.decoy.poll() is None, "the stand-in trainer was killed"
        assert _with(self.cfg["nonce"]) == [], "a detached process outlived its run"
        assert _new_shm_entries(self.shm_before, self.cfg["shm_name"]) == []
        assert _sandbox_dirs() - self.dirs_before == set()
        assert _our_children(ignore=(self.decoy.pid,)) == []


@pytest.fixture
def arena(monkeypatch):
    target = tempfile.mkdtemp(prefix="align-sandbox-target-", dir="/var/tmp")
    os.chmod(target, 0o777)  # so that only the sandbox, not file permissions, keeps writes out
    existing = os.path.join(target, "existing")
    open(existing, "w").close()
    os.chmod(existing, 0o666)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    secret = "align-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("ALIGN_SANDBOX_TEST_SECRET", secret)
    decoy = subprocess.Popen(["sleep", "300"], env={"ALIGN_SANDBOX_TEST_SECRET": secret})
    marker = "align-sandbox-marker-" + os.urandom(4).hex()
    with open(f"/dev/shm/{marker}", "w") as f:
        f.write("pwned")
    cfg = {
        "target": target, "port": listener.getsockname()[1], "decoy": decoy.pid, "caller": os.getpid(),
        "secret": secret, "shm_name": "align-sandbox-shm-" + os.urandom(4).hex(), "shm_marker": marker,
        "nonce": f"97.{int.from_bytes(os.urandom(3), 'big')}", "nsenter": shutil.which("nsenter"),
        "python": sys.executable,
    }  # fmt: skip
    found = Arena(cfg, listener, decoy, set(os.listdir("/dev/shm")), _sandbox_dirs())
    yield found
    for pid in _with(cfg["nonce"]):
        os.kill(pid, signal.SIGKILL)
    decoy.kill()
    decoy.wait()
    listener.close()
    for name in (marker, cfg["shm_name"]):
        if os.path.exists(f"/dev/shm/{name}"):
            os.remove(f"/dev/shm/{name}")
    shutil.rmtree(target)


def _assert_all_held(report: dict) -> None:
    expected = {name: 1.0 if name == "honest" else 0.0 for name in sandbox_attacks.PROGRAMS}
    assert report["scores"] == expected
    for name, run in report["unhooked"].items():
        assert ("pwned" in run["stdout"]) == (name == "honest"), (name, run)
        assert run["isolation"].startswith("userns"), (name, run)
    why = {name: run["stderr"] for name, run in report["unhooked"].items()}
    for name in ("mkfifo_outside", "mknod_outside", "setxattr_outside", "write_outside"):
        assert "Read-only file system" in why[name], why[name]
    assert "unable to open database file" in why["sqlite_outside"]
    assert "cannot open /proc/" in why["nsenter_host_network"]
    assert "No such file or directory: '/proc/" in why["trainer_environ"]
    assert "Network is unreachable" in why["network_connect"]
    assert "name resolution" in why["dns_lookup"]
    assert "ProcessLookupError" in why["kill_parent"]


def test_attacks_work_without_the_sandbox(arena):
    """The hostile programs are real: with no isolation and no hook each one gets out."""
    runs = sandbox_attacks.run_all(arena.cfg, ESCAPES, guard=False, isolate=False)
    assert {name: "pwned" in run["stdout"] for name, run in runs.items()} == dict.fromkeys(ESCAPES, True), runs
    assert arena.accepted() and "shell.txt" in os.listdir(arena.cfg["target"])
    assert os.path.exists(f"/dev/shm/{arena.cfg['shm_name']}")
    detached = sandbox_attacks.run_all(arena.cfg, ["detached_survivor"], guard=False, isolate=False)
    assert detached["detached_survivor"]["rc"] == 0 and _with(arena.cfg["nonce"])


def test_attacks_score_zero_as_root(arena):
    """In this process (root in CI): through the `code` reward with the hook, and directly without it."""
    report = sandbox_attacks.attack_all(arena.cfg)
    _assert_all_held(report)
    arena.assert_untouched()


def test_attacks_score_zero_as_a_non_root_uid(arena):
    """The same from a caller that is uid 1000 in a user namespace of its own.

    The fork bomb runs only with the hook there: such a caller is the host's uid 0 underneath,
    which the kernel exempts from RLIMIT_NPROC (it would fork until the wall clock); a real
    non-root uid is not exempt (test_fork_bomb_is_capped_for_a_real_non_root_caller).
    """
    cfg = {**arena.cfg, "unhooked_except": ["fork_bomb"]}
    cmd = ["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable]
    cmd += ["-m", "tests.rewards.sandbox_attacks", json.dumps(cfg)]
    done = subprocess.run(cmd, cwd=ROOT_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["uid"] == 1000
    _assert_all_held(report)
    arena.assert_untouched()


CONFINEMENT_REPORT = """
import json, os, socket
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
def err(path):
    try:
        open(path, "w")
    except OSError as e:
        return e.errno
    return 0
print(json.dumps({
    "uid": os.getuid(), "nnp": status["NoNewPrivs"].strip(),
    "caps": [status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
    "root": err("/x"), "etc": err("/etc/x"), "work": err("ok.txt"), "cwd": os.getcwd(),
    "caller": os.path.exists("/proc/CALLER"), "pids": [p for p in os.listdir("/proc") if p.isdigit()],
    "nics": [n for _, n in socket.if_nameindex()], "dev": sorted(os.listdir("/dev")),
}))
"""


def test_the_child_is_unprivileged_and_confined():
    code = CONFINEMENT_REPORT.replace("CALLER", str(os.getpid()))
    result = run_python(code, limits=FAST, guard=False)
    facts = json.loads(result.stdout)
    assert facts["uid"] != 0 and facts["caps"] == ["0000000000000000"] * 5 and facts["nnp"] == "1"
    assert facts["root"] == facts["etc"] == errno.EROFS and facts["work"] == 0
    assert not facts["caller"] and len(facts["pids"]) <= 3 and facts["nics"] == ["lo"]
    assert facts["cwd"] == sandbox.SANDBOX_WORK and result.isolation.startswith("userns")
    assert set(facts["dev"]) <= {"null", "zero", "full", "random", "urandom", "fd", "stdin", "stdout", "stderr", "shm"}


def test_probe_checks_name_each_missing_layer():
    facts = {
        "ids": [0, 0, 0, 0], "caps": {"CapEff": 1, "CapBnd": 0}, "nnp": "0", "seccomp": "0",
        "writes": {"/": 0, "/usr": errno.EACCES, "work": errno.EROFS}, "pids": list(range(1, 40)),
        "caller_visible": True, "interfaces": ["eth0", "lo"], "dev": ["null", "vda"],
        "mounts": {"/": ["ext4", ["rw"]], "/tmp": ["ext4", ["rw"]], "/dev/shm": ["tmpfs", ["ro"]], "/proc": None},
    }  # fmt: skip
    found = " | ".join(sandbox._problems(facts))
    for layer in ("unprivileged identity", "capabilities", "no_new_privs", "read-only root", "work directory",
                  "mount namespace: /tmp", "mount namespace: /dev/shm", "mount namespace: /proc", "fresh /proc",
                  "network namespace", "minimal /dev: also holds ['vda']"):  # fmt: skip
        assert layer in found
    good = sandbox.isolation(sys.executable)
    assert good.problem is None and good.label.startswith("userns")


def test_a_layer_that_fails_to_set_up_is_named(monkeypatch):
    broken = sandbox._INIT_SOURCE.replace("libc.unshare(_NAMESPACES)", "libc.unshare(-1)")
    assert broken != sandbox._INIT_SOURCE
    monkeypatch.setattr(sandbox, "_INIT_SOURCE", broken)
    found = sandbox.isolation.__wrapped__(sys.executable)
    assert found.label == "none" and "namespaces (user, mount, pid, network" in found.problem
    with pytest.raises(SandboxUnavailable, match="namespaces .*unsafe_no_isolation"):
        run_python("print(1)", limits=FAST)


def test_a_missing_layer_makes_the_code_reward_refuse(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda python: Isolation("none", "mount namespace: refused (test)"))
    program = "```python\nprint(input())\n```"
    with pytest.raises(SandboxUnavailable, match=r"mount namespace: refused \(test\).*unsafe_no_isolation: true"):
        code_reward(["p"], [program], tests=[[{"input": "hi", "output": "hi"}]])
    with pytest.raises(RewardConfigError, match=r"rewards\[0\] \(code\).*mount namespace.*unsafe_no_isolation"):
        build_rewards([{"name": "code"}])
    with pytest.raises(SandboxUnavailable):
        run_python("print(1)", limits=FAST)
    build_rewards([{"name": "code", "params": {"unsafe_no_isolation": True}}])
    with pytest.warns(UnsafeSandboxWarning, match="WITHOUT namespace isolation"):
        scores = code_reward(["p"], [program], tests=[[{"input": "hi", "output": "hi"}]], unsafe_no_isolation=True)
    assert scores == [1.0]
    with pytest.raises(RewardConfigError, match="unsafe_no_isolation must be true or false"):
        build_rewards([{"name": "code", "params": {"unsafe_no_isolation": "yes"}}])


def test_a_set_up_failure_during_a_run_raises(monkeypatch):
    monkeypatch.setattr(sandbox, "SANDBOX_WORK", "/nonexistent/work")
    with pytest.raises(SandboxUnavailable, match="sandbox set-up failed: .*nonexistent"):
        run_python("print(1)", limits=FAST)


@pytest.mark.parametrize("isolate", [True, False])
def test_runs_code_with_stdin_and_cleans_up(isolate):
    before = _sandbox_dirs()
    code = "import os, sys\nopen('note.txt', 'w').write('x')\nprint(sys.stdin.read().upper())\nprint(*os.environ)"
    result = run_python(code, "abc", FAST, isolate=isolate)
    assert result.passed and result.returncode == 0 and not result.timed_out
    first, env = result.stdout.splitlines()
    assert first == "ABC" and set(env.split()) <= {"HOME", "LANG", "PATH", "PWD", "TMPDIR"}
    assert _sandbox_dirs() == before


def test_failure_and_stderr_are_reported():
    result = run_python("import sys\nprint('out')\nsys.exit('bad things')", limits=FAST)
    assert not result.passed and result.returncode == 1
    assert result.stdout == "out\n" and "bad things" in result.stderr


def test_output_is_truncated():
    limits = SandboxLimits(timeout_s=3.0, max_output_bytes=1000)
    result = run_python("print('x' * 200_000)", limits=limits)
    assert result.passed and len(result.stdout) < 1100 and "truncated: 200001 bytes" in result.stdout


def test_infinite_loop_hits_cpu_limit():
    result = run_python("while True:\n    pass", limits=FAST, guard=False)
    assert not result.passed and result.duration_s < FAST.timeout_s + 0.5
    assert result.returncode == -signal.SIGXCPU or result.timed_out
    assert _group_gone(result.pgid)


def test_sleeping_forever_hits_wall_clock():
    limits = SandboxLimits(timeout_s=1.0, cpu_s=5)
    result = run_python("import time\ntime.sleep(60)", limits=limits)
    assert result.timed_out and not result.passed and result.duration_s < 2.0
    assert _group_gone(result.pgid)


@pytest.mark.parametrize("isolate", [True, False])
def test_leftover_children_are_killed_without_the_guard(isolate):
    code = "import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        time.sleep(60)\nprint('bye')"
    result = run_python(code, limits=FAST, guard=False, isolate=isolate)
    assert result.stdout.startswith("bye")
    assert _group_gone(result.pgid)


def test_fork_bomb_hits_the_process_limit_without_the_guard():
    result = run_python("import os\nwhile True:\n    os.fork()", limits=FAST, guard=False)
    assert not result.passed and not result.timed_out and "BlockingIOError" in result.stderr
    assert _group_gone(result.pgid)


def test_file_work_inside_the_work_directory_is_allowed():
    code = (
        "import os, shutil, tempfile, multiprocessing\n"
        "os.mkdir('d'); os.mkdir('d/e'); os.rename('d/e', 'd/f'); os.chmod('d', 0o755); os.utime('d')\n"
        "open('d/f/x', 'w').write('1'); os.symlink('x', 'd/f/y'); os.link('d/f/x', 'd/f/z')\n"
        "os.remove('d/f/z'); os.truncate('d/f/x', 0); shutil.rmtree('d')\n"
        "tempfile.TemporaryFile().write(b'x'); tempfile.mkdtemp(); open('/dev/null', 'w').write('x')\n"
        "os.mkdir('g'); fd = os.open('g', os.O_RDONLY); os.close(os.open('h', os.O_WRONLY | os.O_CREAT, dir_fd=fd))\n"
        "os.mkdir('i', dir_fd=fd); os.rename('h', 'j', src_dir_fd=fd, dst_dir_fd=fd); shutil.rmtree('g')\n"
        "open('/tmp/scratch', 'w').write('x'); multiprocessing.Lock()\n"
        "print('ok')"
    )
    result = run_python(code, limits=FAST)
    assert result.passed and result.stdout == "ok\n", result.stderr


# The audit hook stays as an extra layer; these check it on its own (no namespaces).


@pytest.mark.parametrize(
    "code",
    [
        "import subprocess\nsubprocess.run(['sleep', '30'])",
        "import os\nos.system('sleep 30')",
        "import multiprocessing as mp\nmp.Process(target=print).start()",
        "import _posixsubprocess\n_posixsubprocess.fork_exec()",
        "import ctypes",
        "import os\nos.execv('/bin/sh', ['sh'])",
        "import os\nwhile True:\n    os.fork()",
        "import socket\nsocket.getaddrinfo('localhost', 80)",
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
    ],
)
def test_the_hook_refuses_spawning_and_sockets(code):
    result = run_python(code, limits=FAST, isolate=False)
    assert not result.passed and "sandbox:" in result.stderr


@pytest.mark.parametrize(
    "code",
    [
        "open({target!r}, 'w').write('x')",
        "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
        "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')",
        "import os\nos.chdir('/')\nopen({target!r}.lstrip('/'), 'w').write('x')",
        "import shutil\nshutil.copy(__file__, {target!r})",
        "import os\nfd = os.open(os.path.dirname({target!r}), os.O_RDONLY)\n"
        "os.close(os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
        "import os\nfd = os.open(os.path.dirname({target!r}), os.O_RDONLY)\nos.mkdir('escaped.txt', dir_fd=fd)",
    ],
)
def test_the_hook_blocks_writes_outside_the_work_directory(tmp_path, code):
    target = str(tmp_path / "escaped.txt")
    result = run_python(code.format(target=target), limits=FAST, isolate=False)
    assert not result.passed and "sandbox:" in result.stderr
    assert not os.path.exists(target)


def test_seccomp_layer_where_libseccomp_is_installed():
    """Optional layer: present exactly when libseccomp can be loaded; then unshare/mount get EPERM."""
    has_lib = ctypes.util.find_library("seccomp") is not None
    label = sandbox.isolation(sys.executable).label
    assert ("seccomp skipped" not in label and label.endswith("seccomp")) == has_lib, label
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER: allowed to anyone without seccomp
        "print(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno())"
    )
    result = run_python(code, limits=FAST, guard=False)
    lines = result.stdout.split("\n")
    assert lines[1] == f"-1 {errno.EPERM}"  # no capabilities, seccomp or not
    assert (lines[0] == f"-1 {errno.EPERM}") == has_lib, result.stdout


def test_an_interpreter_under_tmp_and_a_closed_directory(tmp_path):
    """A venv in the caller's /tmp (covered by the sandbox's own /tmp), below a 0700 directory."""
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(closed / "venv")], check=True)
    python = str(closed / "venv" / "bin" / "python")
    assert sandbox.isolation(python).problem is None
    result = run_python("import os, sys\nprint(sys.prefix, os.getuid())", limits=FAST, python=python)
    assert result.stdout.split() == [str(closed / "venv"), "65534"], result.stderr


def test_fork_bomb_is_capped_for_a_real_non_root_caller():
    """Caller with a host uid other than 0 (uid 65534 through setpriv when the tests run as root).

    The system's python3 runs it (the venv's interpreter may sit under a directory that uid
    65534 cannot enter), on a copy of the three sandbox files in a directory it can read.
    """
    copy = tempfile.mkdtemp(prefix="align-sandbox-copy-", dir="/var/tmp")
    try:
        for name in ("sandbox.py", "_sandbox_init.py", "_sandbox_child.py"):
            shutil.copy(os.path.join(ROOT_DIR, "rewards", name), copy)
        os.chmod(copy, 0o755)
        code = (
            f"import sys; sys.path.insert(0, {copy!r}); import sandbox, os\n"
            "limits = sandbox.SandboxLimits(timeout_s=4.0, cpu_s=1, memory_mb=256, nproc=16)\n"
            "r = sandbox.run_python('import os\\nwhile True:\\n    os.fork()', limits=limits, guard=False)\n"
            "print(os.getuid(), r.returncode, r.timed_out, 'BlockingIOError' in r.stderr, r.isolation)"
        )
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        python = "/usr/bin/python3" if os.geteuid() == 0 else sys.executable
        done = subprocess.run([*prefix, python, "-c", code], cwd=copy, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(copy)
    assert done.returncode == 0, done.stderr[-2000:]
    uid, rc, timed_out, blocked, label = done.stdout.split(maxsplit=4)
    assert uid != "0" and rc == "1" and timed_out == "False" and blocked == "True", done.stdout
    assert label.startswith("userns")
