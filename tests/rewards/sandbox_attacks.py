"""Hostile programs for the sandbox tests, and a runner that scores them through the ``code`` reward.

Each program prints ``pwned`` only when its attack worked as seen from inside (it crashes
otherwise), and every row's only test expects ``pwned``: an escape scores 1.0. The programs
go past the in-process audit hook on purpose (``_posixsubprocess`` re-imported, no
``subprocess``), so what stops them is the kernel-level isolation.

Run as a module (``python -m tests.rewards.sandbox_attacks CONFIG_JSON``) it prints the
results of :func:`attack_all` as JSON: the tests run it inside a user namespace as a non-root
uid to cover callers that are not root.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from rewards.code_exec import code_reward
from rewards.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(timeout_s=4.0, cpu_s=1, memory_mb=256, nproc=16)
PWNED_TEST = [{"input": "", "output": "pwned"}]

PRELUDE = '''
import json, os, sys
CFG = json.loads({cfg!r})
T = CFG["target"]


def spawn(argv, setsid=False):
    """Start ``argv`` through a fresh copy of _posixsubprocess, past any patch in this interpreter."""
    sys.modules.pop("_posixsubprocess", None)
    import _posixsubprocess
    args = [os.fsencode(a) for a in argv]
    err_r, err_w = os.pipe()
    pid = _posixsubprocess.fork_exec(
        args, [args[0]], True, (), None, None, -1, -1, -1, -1, -1, -1, err_r, err_w,
        True, setsid, -1, None, None, None, -1, None, False)
    os.close(err_w)
    failure = os.read(err_r, 1000)
    os.close(err_r)
    if failure:
        raise OSError(failure.decode(errors="replace"))
    return pid
'''

CONNECT = "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('pwned')"

PROGRAMS = {
    "honest": "print('pwned')",  # not an attack: shows that a run which gets this far scores 1
    # escaped the earlier audit-hook-only sandbox when run as root: a shell writes outside it
    "posixsubprocess_shell_writes_outside": (
        "os.waitpid(spawn(['/bin/sh', '-c', 'echo pwned > ' + T + '/shell.txt']), 0)\n"
        "print(open(T + '/shell.txt').read().strip())"
    ),
    "nsenter_host_network": (
        "inner = CONNECT.format(port=CFG['port'])\n"
        "os.waitpid(spawn([CFG['nsenter'], '--net=/proc/%d/ns/net' % CFG['decoy'], CFG['python'], '-c', inner]), 0)"
    ),
    "sqlite_outside": (
        "import sqlite3\ndb = sqlite3.connect(T + '/db.sqlite')\ndb.execute('create table t (x)')\ndb.commit()\n"
        "print('pwned')"
    ),
    "mkfifo_outside": "os.mkfifo(T + '/fifo')\nprint('pwned')",
    "mknod_outside": "os.mknod(T + '/node')\nprint('pwned')",
    "setxattr_outside": "os.setxattr(T + '/existing', 'user.pwned', b'1')\nprint('pwned')",
    "shm_open_host": (
        "import _posixshmem\n_posixshmem.shm_open('/' + CFG['shm_name'], os.O_CREAT | os.O_RDWR, 0o600)\n"
        "print(open('/dev/shm/' + CFG['shm_marker']).read().strip())"
    ),
    "trainer_environ": (
        "data = open('/proc/%d/environ' % CFG['decoy'], 'rb').read()\n"
        "print('pwned' if CFG['secret'].encode() in data else 'clean')"
    ),
    # the usual ones
    "infinite_loop": "while True:\n    pass\nprint('pwned')",
    "fork_bomb": "while True:\n    os.fork()",
    "memory_hog": "hoard = []\nwhile True:\n    hoard.append(' ' * 10**7)",
    "network_connect": "exec(CONNECT.format(port=CFG['port']))",
    "write_outside": "open(T + '/written.txt', 'w').write('x')\nprint('pwned')",
    "environ_read": "print('pwned' if any(CFG['secret'] in v for v in os.environ.values()) else 'clean')",
    "kill_parent": (
        "import signal\nos.kill(CFG['decoy'], signal.SIGKILL)\nos.kill(CFG['caller'], signal.SIGKILL)\n"
        "os.kill(os.getppid(), signal.SIGKILL)\nprint('pwned')"
    ),
    "output_flood": "while True:\n    sys.stdout.write('x' * 65536)",
    "detached_survivor": "spawn(['/bin/sleep', CFG['nonce']], setsid=True)\nprint('started')",
    "dns_lookup": "import socket\nsocket.getaddrinfo('example.com', 80)\nprint('pwned')",
}


def program(name: str, cfg: dict) -> str:
    """The full source of attack ``name`` with the test's ``cfg`` baked in."""
    return PRELUDE.format(cfg=json.dumps(cfg)) + f"CONNECT = {CONNECT!r}\n" + PROGRAMS[name] + "\n"


def completion(name: str, cfg: dict) -> str:
    return f"Sure.\n```python\n{program(name, cfg)}```\n"


def score_all(cfg: dict, names: list[str]) -> dict[str, float | None]:
    """Scores of the attacks through the ``code`` reward, exactly as a GRPO run calls it."""
    kwargs = {"timeout_s": LIMITS.timeout_s, "cpu_s": LIMITS.cpu_s, "memory_mb": LIMITS.memory_mb, "workers": 4}
    scores = code_reward(
        ["p"] * len(names), [completion(n, cfg) for n in names], tests=[PWNED_TEST] * len(names), **kwargs
    )
    return dict(zip(names, scores, strict=True))


def run_all(cfg: dict, names: list[str], *, guard: bool, isolate: bool = True) -> dict[str, dict]:
    """Each attack run directly (``guard=False``: the audit hook off), with its output."""

    def one(name: str) -> dict:
        r = run_python(program(name, cfg), limits=LIMITS, guard=guard, isolate=isolate)
        return {"rc": r.returncode, "stdout": r.stdout[-2000:], "stderr": r.stderr[-2000:], "isolation": r.isolation}

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def attack_all(cfg: dict) -> dict:
    """Both ways (reward with the hook, direct without it, less ``cfg['unhooked_except']``) and who ran them."""
    names = list(PROGRAMS)
    unhooked = [n for n in names if n not in cfg.get("unhooked_except", ())]
    return {
        "uid": os.getuid(),
        "scores": score_all(cfg, names),
        "unhooked": run_all(cfg, unhooked, guard=False),
    }


if __name__ == "__main__":
    print(json.dumps(attack_all(json.loads(sys.argv[1]))))
