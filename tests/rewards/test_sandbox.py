"""The sandbox against hostile programs; limits are small so the suite stays fast."""

import os
import sys
import tempfile
import time

import pytest

from rewards import sandbox
from rewards.sandbox import SandboxLimits, isolation, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

FAST = SandboxLimits(timeout_s=3.0, cpu_s=1, memory_mb=256, nproc=16)
SYSTEM_PYTHON = "/usr/bin/python3"


def _live_members(pgid: int) -> list[int]:
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            live.append(int(entry))
    return live


def _group_gone(pgid: int, wait_s: float = 2.0) -> bool:
    deadline = time.monotonic() + wait_s
    while _live_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _our_children() -> list[int]:
    me = str(os.getpid())
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] not in ("Z", "X"):
            kids.append(int(entry))
    return kids


def _drops_to_nobody() -> bool:
    return os.path.exists(SYSTEM_PYTHON) and "nobody" in isolation(SYSTEM_PYTHON)[0]


@pytest.fixture(autouse=True)
def healthy_afterwards():
    yield
    assert _our_children() == []
    assert run_python("print(6 * 7)", limits=FAST).stdout == "42\n"


@pytest.fixture
def workdirs(monkeypatch):
    made = []
    real = tempfile.mkdtemp

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", spy)
    return made


@pytest.mark.parametrize("isolate", [True, False])
def test_runs_code_with_stdin_and_cleans_up(workdirs, isolate):
    code = "import os, sys\nopen('note.txt', 'w').write('x')\nprint(sys.stdin.read().upper())\nprint(*os.environ)"
    result = run_python(code, "abc", FAST, isolate=isolate)
    assert result.passed and result.returncode == 0 and not result.timed_out
    first, env = result.stdout.splitlines()
    assert first == "ABC" and set(env.split()) <= {"HOME", "LANG", "PATH", "PWD", "TMPDIR"}
    assert workdirs and not any(os.path.exists(d) for d in workdirs)


def test_failure_and_stderr_are_reported():
    result = run_python("import sys\nprint('out')\nsys.exit('bad things')", limits=FAST)
    assert not result.passed and result.returncode == 1
    assert result.stdout == "out\n" and "bad things" in result.stderr


def test_output_is_truncated():
    limits = SandboxLimits(timeout_s=3.0, max_output_bytes=1000)
    result = run_python("print('x' * 200_000)", limits=limits)
    assert result.passed and len(result.stdout) < 1100 and "truncated: 200001 bytes" in result.stdout


def test_infinite_loop_hits_cpu_limit():
    result = run_python("while True:\n    pass", limits=FAST)
    assert not result.passed and result.duration_s < FAST.timeout_s + 0.5
    assert result.returncode < 0 or result.timed_out
    assert _group_gone(result.pgid)


def test_sleeping_forever_hits_wall_clock():
    limits = SandboxLimits(timeout_s=1.0, cpu_s=5)
    result = run_python("import time\ntime.sleep(60)", limits=limits)
    assert result.timed_out and not result.passed and result.duration_s < 2.0
    assert _group_gone(result.pgid)


@pytest.mark.parametrize("isolate", [True, False])
def test_fork_bomb_is_stopped(isolate):
    result = run_python("import os\nwhile True:\n    os.fork()", limits=FAST, isolate=isolate)
    assert not result.passed and result.duration_s < FAST.timeout_s + 0.5
    assert "os.fork is not allowed" in result.stderr
    assert _group_gone(result.pgid)


@pytest.mark.parametrize(
    "code",
    [
        "import subprocess\nsubprocess.run(['sleep', '30'])",
        "import os\nos.system('sleep 30')",
        "import multiprocessing as mp\nmp.Process(target=print).start()",
        "import _posixsubprocess\n_posixsubprocess.fork_exec()",
        "import ctypes",
        "import os\nos.execv('/bin/sh', ['sh'])",
    ],
)
def test_other_ways_to_spawn_are_refused(code):
    result = run_python(code, limits=FAST)
    assert not result.passed and "sandbox:" in result.stderr


@pytest.mark.parametrize("isolate", [True, False])
def test_leftover_children_are_killed_without_the_guard(isolate):
    code = "import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        time.sleep(60)\nprint('bye')"
    result = run_python(code, limits=FAST, guard=False, isolate=isolate)
    assert result.stdout.startswith("bye")
    assert _group_gone(result.pgid)


def test_memory_hog_gets_memory_error():
    result = run_python("a = []\nwhile True:\n    a.append(' ' * 10**6)", limits=FAST)
    assert not result.passed and "MemoryError" in result.stderr


@pytest.mark.parametrize(("guard", "isolate"), [(True, False), (False, True)])
def test_network_is_blocked(guard, isolate):
    if not guard and isolation(sys.executable)[0] == "none":
        pytest.skip("no network namespace here")
    code = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\nprint('connected')"
    result = run_python(code, limits=FAST, guard=guard, isolate=isolate)
    assert not result.passed and "connected" not in result.stdout
    assert ("sandbox: socket" in result.stderr) if guard else ("unreachable" in result.stderr)


def test_dns_is_blocked():
    result = run_python("import socket\nsocket.getaddrinfo('localhost', 80)", limits=FAST)
    assert not result.passed and "sandbox: socket.getaddrinfo" in result.stderr


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
def test_writes_outside_the_work_directory_are_blocked(tmp_path, code):
    target = str(tmp_path / "escaped.txt")
    result = run_python(code.format(target=target), limits=FAST, isolate=False)
    assert not result.passed and "sandbox:" in result.stderr
    assert not os.path.exists(target)


def test_removing_outside_files_is_blocked(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    result = run_python(f"import os\nos.remove({str(victim)!r})", limits=FAST)
    assert not result.passed and victim.read_text() == "keep"


def test_file_work_inside_the_work_directory_is_allowed():
    code = (
        "import os, shutil, tempfile\n"
        "os.mkdir('d'); os.mkdir('d/e'); os.rename('d/e', 'd/f'); os.chmod('d', 0o755); os.utime('d')\n"
        "open('d/f/x', 'w').write('1'); os.symlink('x', 'd/f/y'); os.link('d/f/x', 'd/f/z')\n"
        "os.remove('d/f/z'); os.truncate('d/f/x', 0); shutil.rmtree('d')\n"
        "tempfile.TemporaryFile().write(b'x'); tempfile.mkdtemp(); open('/dev/null', 'w').write('x')\n"
        "os.mkdir('g'); fd = os.open('g', os.O_RDONLY); os.close(os.open('h', os.O_WRONLY | os.O_CREAT, dir_fd=fd))\n"
        "os.mkdir('i', dir_fd=fd); os.rename('h', 'j', src_dir_fd=fd, dst_dir_fd=fd); shutil.rmtree('g')\n"
        "print('ok')"
    )
    result = run_python(code, limits=FAST)
    assert result.passed and result.stdout == "ok\n"


@pytest.mark.skipif(not _drops_to_nobody(), reason="needs root, unshare and a python that uid 65534 can run")
def test_uid_drop_blocks_writes_and_caps_processes_without_the_guard(tmp_path):
    target = str(tmp_path / "escaped.txt")
    wrote = run_python(f"open({target!r}, 'w')", limits=FAST, guard=False, python=SYSTEM_PYTHON)
    assert not wrote.passed and "Permission denied" in wrote.stderr and not os.path.exists(target)
    code = (
        "import os, time\nmade = 0\nfor _ in range(64):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n    made += 1\nprint(made)"
    )
    capped = run_python(code, limits=FAST, guard=False, python=SYSTEM_PYTHON)
    assert int(capped.stdout) < FAST.nproc
    assert _group_gone(capped.pgid)
