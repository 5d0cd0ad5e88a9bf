"""Trusted launcher of :mod:`rewards.sandbox`: build the isolation, then exec the untrusted child.

The parent runs this file's source as ``python -I -S -c <source> <config json>``; nothing here
runs on import. Four processes, each waiting for the next and passing its exit status up
(128+N when the next one died of signal N):

1. launcher (the caller's identity, host namespaces): forks the holder and writes the holder's
   uid/gid maps from outside, which a process cannot do for itself when it maps more than its
   own id;
2. holder: unshares user, mount, pid, network, IPC, UTS and cgroup namespaces in one call (so
   the new user namespace owns the others), makes every mount private, forks;
3. init, pid 1 of the new pid namespace: builds the file system (interpreter exposed, a
   minimal ``/dev``, everything read-only, a fresh ``subset=pid`` ``/proc``, tmpfs on ``/tmp``
   and ``/dev/shm``, the interpreter's trees under ``/tmp`` re-attached, the work directory in
   ``/tmp``), drops to the unprivileged identity with no capabilities and ``no_new_privs``,
   loads the seccomp filter where libseccomp exists, forks, and reaps until its child ends;
   then the kernel kills whatever is left in the namespace;
4. the child: says ``ready`` on the status pipe and execs the untrusted interpreter.

The identity: as root, uid/gid 65534 of the host (the new user namespace maps 0 to 0 for the
set-up steps and 65534 to 65534); otherwise the caller's own uid, seen as 65534 inside a
second, nested user namespace. Every failure is written to the status pipe as
``error <layer>: <reason>`` and the process exits 125; the parent raises on it.
"""

import ctypes
import json
import os
import signal
import stat
import sys

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWTIME = 0x10000000, 0x20000000, 0x40000000, 0x80
_NAMESPACES = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, MOVE_MOUNT_F_EMPTY_PATH = 0x1, os.O_CLOEXEC, 0x4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
# The new mount API has one number on every architecture but alpha (asm-generic and x86 agree).
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 4, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522
SETUP_FAILED = 125
_EPERM, _EINVAL, _ENOSYS = 1, 22, 38
_DEVICES = ("null", "zero", "full", "random", "urandom")
_SECCOMP_ALLOW = 0x7FFF0000
_SECCOMP_DENIED = (
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
    "fspick", "mount_setattr", "unshare", "setns", "ptrace", "process_vm_readv", "process_vm_writev",
    "pidfd_getfd", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "open_by_handle_at", "name_to_handle_at", "acct", "swapon", "swapoff",
    "reboot", "syslog", "quotactl", "iopl", "ioperm", "vhangup",
)  # fmt: skip
_CLONE_NS_FLAGS = (
    CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWTIME,
)  # fmt: skip


class SetupError(Exception):
    """One isolation layer could not be set up; ``str()`` is ``<layer>: <reason>``."""

    def __init__(self, layer, reason):
        super().__init__(f"{layer}: {reason}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _ArgCmp(ctypes.Structure):  # libseccomp's struct scmp_arg_cmp
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.syscall.restype = ctypes.c_long
    return libc


def _ok(layer, rc):
    if rc < 0:
        err = ctypes.get_errno()
        raise SetupError(layer, f"{os.strerror(err)} (errno {err})")
    return rc


def _report(fd, line):
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    except OSError:
        pass


def _exit_code(status):
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _wait(pid):
    return _exit_code(os.waitpid(pid, 0)[1])


def _branch(cfg, fn, *args):
    """Run ``fn`` in a forked process and leave with its return value; never return."""
    code = SETUP_FAILED
    try:
        code = fn(cfg, *args)
    except SetupError as exc:
        _report(cfg["status_fd"], f"error {exc}")
    except BaseException as exc:  # noqa: BLE001 - a trusted step failed unexpectedly: report, never go on
        _report(cfg["status_fd"], f"error sandbox set-up: {type(exc).__name__}: {exc}")
    os._exit(code)


def _write_file(layer, path, text):
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise SetupError(layer, f"writing {text.strip()!r} to {path}: {exc.strerror}") from exc


def _write_maps(pid, cfg):
    """Map the holder's user namespace: root keeps 0 for set-up and the child's id unprivileged."""
    uid, gid, child = os.geteuid(), os.getegid(), cfg["uid"]
    if uid == 0:
        _write_file("uid/gid map", f"/proc/{pid}/uid_map", f"0 0 1\n{child} {child} 1\n")
        _write_file("uid/gid map", f"/proc/{pid}/gid_map", f"0 0 1\n{child} {child} 1\n")
    else:
        _write_file("uid/gid map", f"/proc/{pid}/uid_map", f"0 {uid} 1\n")
        _write_file("uid/gid map", f"/proc/{pid}/setgroups", "deny")
        _write_file("uid/gid map", f"/proc/{pid}/gid_map", f"0 {gid} 1\n")


def _launcher(cfg):
    cfg["root_caller"] = os.geteuid() == 0
    to_holder_r, to_holder_w = os.pipe()
    from_holder_r, from_holder_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_holder_w)
        os.close(from_holder_r)
        _branch(cfg, _holder, from_holder_w, to_holder_r)
    os.close(to_holder_r)
    os.close(from_holder_w)
    if os.read(from_holder_r, 1) == b"1":  # else the holder failed and reported why
        try:
            _write_maps(pid, cfg)
        except SetupError:
            os.kill(pid, signal.SIGKILL)
            raise
        os.write(to_holder_w, b"1")
    return _wait(pid)


def _holder(cfg, to_launcher, from_launcher):
    libc = _libc()
    _ok("parent-death signal", libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
    _ok("namespaces (user, mount, pid, network, ipc, uts, cgroup)", libc.unshare(_NAMESPACES))
    os.write(to_launcher, b"1")
    if os.read(from_launcher, 1) != b"1":
        raise SetupError("uid/gid map", "the launcher did not map the user namespace")
    _ok("private mount propagation", libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
    pid = os.fork()
    if pid == 0:
        _branch(cfg, _init)
    return _wait(pid)


def _blocked(path):
    """The topmost directory above ``path`` that other users may not search, or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        directory = "/" + "/".join(parts[:i])
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return directory
    return None


def _mask(libc, directory, keep, layer):
    """Cover ``directory`` with an empty tmpfs that holds only the entries in ``keep``."""
    clones = _clone(libc, [f"{directory}/{name}" for name in keep], layer)
    _ok(layer, libc.mount(b"tmpfs", os.fsencode(directory), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=64k"))
    _attach(libc, clones, layer)


def _expose(libc, paths):
    """Make ``paths`` reachable for the unprivileged child when a parent directory hides them."""
    for _ in range(16):
        blocked = sorted({b for p in paths if (b := _blocked(p))}, key=len)
        if not blocked:
            return
        top = blocked[0]
        keep = sorted({p[len(top) + 1 :].split("/")[0] for p in paths if p.startswith(top + "/")})
        _mask(libc, top, keep, f"exposing the interpreter under {top}")
    raise SetupError("exposing the interpreter", f"too many hidden directories above {paths}")


def _minimal_dev(libc):
    """A tmpfs ``/dev`` with only the harmless character devices, std streams and a shm mountpoint."""
    _mask(libc, "/dev", [d for d in _DEVICES if os.path.exists(f"/dev/{d}")], "minimal /dev")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm")


def _clone(libc, paths, layer):
    """Detached copies of the mounts at ``paths``, to re-attach under a tmpfs that covers them."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
    return [(p, _ok(layer, libc.syscall(SYS_OPEN_TREE, ctypes.c_long(AT_FDCWD), os.fsencode(p), ctypes.c_long(flags))),
             os.path.isdir(p)) for p in paths]  # fmt: skip


def _attach(libc, clones, layer):
    for path, fd, is_dir in clones:
        os.makedirs(path if is_dir else os.path.dirname(path), mode=0o755, exist_ok=True)
        if not is_dir:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        args = (
            ctypes.c_long(fd),
            b"",
            ctypes.c_long(AT_FDCWD),
            os.fsencode(path),
            ctypes.c_long(MOVE_MOUNT_F_EMPTY_PATH),
        )
        _ok(layer, libc.syscall(SYS_MOVE_MOUNT, *args))
        os.close(fd)


def _build_filesystem(cfg, libc):
    with open(cfg["program"], "rb") as f:
        program = f.read()
    needed = cfg["interpreter"]
    if cfg["root_caller"]:
        _expose(libc, needed)
    _minimal_dev(libc)
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    args = (ctypes.c_long(AT_FDCWD), b"/", ctypes.c_long(AT_RECURSIVE), ctypes.byref(attr), ctypes.sizeof(attr))
    _ok("read-only root (mount_setattr, Linux >= 5.12)", libc.syscall(SYS_MOUNT_SETATTR, *args))
    # After the read-only step: the nested user namespace (non-root callers) writes its maps here.
    # subset=pid (Linux >= 5.8): only process directories, no /proc/sys, sysrq-trigger, kcore ...
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    _ok("fresh /proc", libc.mount(b"proc", b"/proc", b"proc", flags, b"subset=pid"))
    in_tmp = [p for p in needed if p.startswith("/tmp/") and not any(p.startswith(q + "/") for q in needed)]
    clones = _clone(libc, in_tmp, "keeping the interpreter under /tmp")
    options = f"mode=1777,size={cfg['tmpfs_mb']}m,nr_inodes=4096".encode()
    for where in ("/tmp", "/dev/shm"):
        _ok(f"tmpfs on {where}", libc.mount(b"tmpfs", where.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options))
    _attach(libc, clones, "keeping the interpreter under /tmp")
    work = cfg["work"]
    os.mkdir(work, 0o700)
    with open(os.path.join(work, "main.py"), "wb") as f:
        f.write(program)
    if cfg["root_caller"]:
        for path in (work, os.path.join(work, "main.py")):
            os.chown(path, cfg["uid"], cfg["gid"])
    os.chdir(work)


def _drop_capabilities(libc):
    for cap in range(64):  # up to the kernel's last capability, which answers EINVAL after it
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            if ctypes.get_errno() == _EINVAL and cap > 0:
                break
            _ok("capability bounding set", -1)
    _ok("ambient capabilities", libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))


def _drop_identity(cfg, libc):
    """Become ``cfg['uid']``/``cfg['gid']`` with no capabilities in any set and ``no_new_privs``."""
    uid, gid = cfg["uid"], cfg["gid"]
    if cfg["root_caller"]:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
    else:  # only the caller's own id is mapped: nest a user namespace that shows it as uid
        _ok("inner user namespace", libc.unshare(CLONE_NEWUSER))
        _write_file("inner uid/gid map", "/proc/self/uid_map", f"{uid} 0 1\n")
        _write_file("inner uid/gid map", "/proc/self/setgroups", "deny")
        _write_file("inner uid/gid map", "/proc/self/gid_map", f"{gid} 0 1\n")
    _drop_capabilities(libc)
    os.setresuid(uid, uid, uid)
    data = (_CapData * 2)()
    _ok("capabilities", libc.capset(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), data))
    _ok("no_new_privs", libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    _ok("not dumpable", libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0))
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise SetupError("identity", f"still uid {os.getuid()} gid {os.getgid()} after the drop")


def _seccomp_rules(lib, ctx):
    eperm, enosys = 0x50000 | _EPERM, 0x50000 | _ENOSYS
    for name in _SECCOMP_DENIED:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0 and lib.seccomp_rule_add_array(ctx, eperm, nr, 0, None) < 0:
            raise OSError(f"seccomp_rule_add({name}) failed")
    clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
    if clone3 >= 0 and lib.seccomp_rule_add_array(ctx, enosys, clone3, 0, None) < 0:  # libc falls back to clone
        raise OSError("seccomp_rule_add(clone3) failed")
    clone = lib.seccomp_syscall_resolve_name(b"clone")
    for flag in _CLONE_NS_FLAGS:  # SCMP_CMP_MASKED_EQ (7) on the flags, argument 0 on x86-64 and arm64
        cmp = _ArgCmp(0, 7, flag, flag)
        if lib.seccomp_rule_add_array(ctx, eperm, clone, 1, ctypes.byref(cmp)) < 0:
            raise OSError("seccomp_rule_add(clone) failed")


def _load_seccomp():
    """Deny namespace, mount, ptrace and kernel-surface syscalls; a description of what happened."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return "seccomp skipped: libseccomp.so.2 not found"
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
    ]
    lib.seccomp_load.argtypes = lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_SECCOMP_ALLOW)
    if not ctx:
        return "seccomp skipped: seccomp_init failed"
    try:
        _seccomp_rules(lib, ctx)
        if lib.seccomp_load(ctx) < 0:
            return "seccomp skipped: seccomp_load failed"
    except OSError as exc:
        return f"seccomp skipped: {exc}"
    finally:
        lib.seccomp_release(ctx)
    return "seccomp"


def _init(cfg):
    libc = _libc()
    _ok("parent-death signal", libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
    _build_filesystem(cfg, libc)
    _drop_identity(cfg, libc)
    seccomp = _load_seccomp()
    _ok("parent-death signal", libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))  # cleared by setresuid
    pid = os.fork()
    if pid == 0:
        _branch(cfg, _exec_child, seccomp)
    os.close(cfg["status_fd"])
    while True:
        got, status = os.waitpid(-1, 0)
        if got == pid:
            return _exit_code(status)


def _exec_child(cfg, seccomp):
    os.set_inheritable(cfg["status_fd"], False)
    _report(cfg["status_fd"], f"ready {seccomp}")
    try:
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except OSError as exc:
        raise SetupError("starting the interpreter", f"{cfg['argv'][0]}: {exc.strerror}") from exc


def _main():
    cfg = json.loads(sys.argv[1])
    try:
        code = _launcher(cfg)
    except SetupError as exc:
        _report(cfg["status_fd"], f"error {exc}")
        code = SETUP_FAILED
    sys.exit(code)


if __name__ == "__main__":
    _main()
