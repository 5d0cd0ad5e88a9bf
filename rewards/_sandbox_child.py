"""Child side of :mod:`rewards.sandbox`: set limits, install the guard, run the user's script.

The parent passes this file's source with ``python -I -c`` followed by the script path and
a JSON object of limits; nothing here runs on import. The isolation itself is built before this
runs, by :mod:`rewards._sandbox_init`; the guard below is an extra layer inside the untrusted
interpreter, not a security boundary (native code can get around any of it, and the sandbox's
tests show the isolation holding with the guard off):

- resource limits: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE and no
  core files, soft and hard, before the user's code runs;
- an audit hook (``sys.addaudithook``, which cannot be removed from Python) that refuses
  process creation (fork, exec, spawn, system, subprocess), sockets and name lookups,
  ``ctypes``, raising resource limits, signalling other processes, and writes or file-system
  changes outside the work directory and the ``writable`` directories of the config (the
  private ``/tmp`` and ``/dev/shm`` when isolated), checked on the resolved path, ``dir_fd``
  resolved through ``/proc/self/fd``;
- ``_posixsubprocess.fork_exec`` replaced by a function that refuses, and ``os.open``
  wrapped to check writes relative to a ``dir_fd`` (its audit event does not carry one).
"""

import json
import os
import resource
import sys
import types

_MB = 1024 * 1024
_DENIED_EVENTS = frozenset(
    {
        "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec",
        "subprocess.Popen", "os.killpg", "resource.setrlimit", "resource.prlimit",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
        "socket.gethostbyaddr", "socket.getnameinfo",
    }
)  # fmt: skip
_DENIED_IMPORTS = frozenset({"ctypes", "_ctypes"})
_PATH_ARGS = {  # event: ((position of a path, position of its dir_fd or None), ...)
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.utime": ((0, 3),), "os.truncate": ((0, None),), "os.chflags": ((0, None),),
    "os.lchflags": ((0, None),), "shutil.rmtree": ((0, 1),),
}  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_ALWAYS_WRITABLE = ("/dev/null",)


def _set_limit(which, soft, hard):
    _, cur_hard = resource.getrlimit(which)
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
    try:
        resource.setrlimit(which, (min(soft, hard), hard))
    except (ValueError, OSError):
        pass


def _apply_limits(cfg):
    _set_limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)
    _set_limit(resource.RLIMIT_AS, cfg["memory_mb"] * _MB, cfg["memory_mb"] * _MB)
    _set_limit(resource.RLIMIT_FSIZE, cfg["file_size_mb"] * _MB, cfg["file_size_mb"] * _MB)
    _set_limit(resource.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"])
    _set_limit(resource.RLIMIT_NOFILE, cfg["nofile"], cfg["nofile"])
    _set_limit(resource.RLIMIT_CORE, 0, 0)


def _writes(mode, flags):
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool((flags or 0) & _WRITE_FLAGS)


def _inside(path, roots, dir_fd=None):
    if isinstance(path, int):
        return True
    path = os.fsdecode(path)
    if dir_fd not in (None, -1) and not os.path.isabs(path):
        try:
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        except OSError:
            return False
    real = os.path.realpath(path)
    return real in _ALWAYS_WRITABLE or any(real == root or real.startswith(root + os.sep) for root in roots)


def _make_guard(roots):
    def guard(event, args):
        if event == "open":
            if _writes(args[1], args[2]) and not _inside(args[0], roots):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the work directory is not allowed")
        elif event in _PATH_ARGS:
            for i, fd_at in _PATH_ARGS[event]:
                if not _inside(args[i], roots, args[fd_at] if fd_at is not None else None):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the work directory")
        elif event in _DENIED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "import" and args[0] in _DENIED_IMPORTS:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        elif event == "os.kill" and args[0] not in (0, os.getpid()):
            raise PermissionError("sandbox: signalling other processes is not allowed")

    return guard


def _refuse(*args, **kwargs):
    raise PermissionError("sandbox: process creation is not allowed")


def _guarded_open(real_open, roots):
    def open_(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None and flags & _WRITE_FLAGS and not _inside(path, roots, dir_fd):
            raise PermissionError(f"sandbox: writing {path!r} outside the work directory is not allowed")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    return open_


def _install_guard(roots):
    import _posixsubprocess
    import posix

    roots = tuple(os.path.realpath(root) for root in roots)
    _posixsubprocess.fork_exec = _refuse
    os.open = posix.open = _guarded_open(posix.open, roots)
    os.supports_dir_fd.add(os.open)
    sys.addaudithook(_make_guard(roots))


def _main():
    path, cfg = sys.argv[1], json.loads(sys.argv[2])
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    sys.argv = [path]
    sys.dont_write_bytecode = True
    _apply_limits(cfg)
    if cfg["guard"]:
        _install_guard([os.getcwd(), *cfg.get("writable", ())])
    module = types.ModuleType("__main__")
    module.__file__ = path
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


if __name__ == "__main__":
    _main()
