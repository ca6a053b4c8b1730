"""Run untrusted Python (model-written code and its tests) in a fresh, locked-down interpreter.

Candidate code never runs in our process. `run_program` starts `python -I -B sandbox.py --boot ...` in a new
session with a scrubbed environment and kills the whole process group when the time runs out. Layers, outer
to inner (each enforced by the kernel, so the program cannot undo it):

- namespaces (bubblewrap, `bwrap`): own pid, network, IPC and UTS namespaces, and a minimal read-only file
  system: /usr (and the /lib, /bin links), the interpreter's prefix and venv, this file, a few /etc files,
  a private /dev, no /proc; the program's cwd is a size-capped tmpfs. Host files such as /root, the repo and
  the user's work dir are not there at all;
- least privilege: started as root, the boot code drops the capability bounding set, then switches to uid and
  gid 65534 with no supplementary groups, so the program holds no capability (no mknod, no chown, no changing
  other processes) and `no_new_privs` keeps it that way;
- Landlock (Linux >= 5.13): writes only beneath the cwd (no device nodes there) and to /dev/null; from ABI 4
  TCP bind/connect are denied too, from ABI 6 signals and abstract unix sockets cannot reach outside;
- seccomp: `socket()`, `fork`/`vfork`/process-creating `clone`, `clone3` (ENOSYS, libc falls back to `clone`)
  and `io_uring_setup` fail, and so does every call on another process (kill, prlimit, setpriority, affinity,
  scheduling, ptrace, process_vm_*, pidfd, ...: only the program's own pid is accepted); other syscall ABIs
  (x32, `int 0x80`) kill the process;
- rlimits: address space `memory_mb`, CPU seconds, file size, open files, no core dumps.

Layers the machine lacks are skipped: `layers()` reports what is active here, and the first run of a process
that misses one logs a warning. Without bubblewrap a root run keeps uid 0 (with no capabilities) unless every
directory the interpreter reads is open to other users (here /root is 0700): it then owns every root file and
Landlock has no right for metadata, so seccomp refuses chmod/chown/utime/xattr calls outright; the cwd is a
plain temp dir (no size cap) and the host's file system is readable.

Passing. The program passes only when it ran to its end: the boot code appends a line to the program that
writes a per-run random token to a status pipe and leaves at once (`os._exit(0)`, no atexit hooks); any exit
before it (status 0 or not, SystemExit, os._exit, a signal, a thread calling exit) is a failure. The token
reaches the boot code on stdin and exists afterwards only as a constant of the program's own code object,
which the program cannot reach: a Python audit hook refuses `f_code` on the program's module frame,
`sys.settrace`/`sys.setprofile` (a trace function could jump over the checks), `gc` object walks, every ctypes
operation (once ctypes imports, `ctypes.cast` reads any address without an audit event) and opening anything
under /proc (no `/proc/self/mem`). The price: programs cannot import ctypes, nor numpy (which does), and one
that prints a traceback of a module-level exception itself fails for it. The status pipe also carries the boot code's
own messages, each prefixed with the token, so text the program prints (on stderr or the pipe) cannot pass for
them. Residual risk: audit hooks are not a security boundary; an interpreter bug, a C extension in the venv
that reads raw memory, or a way to the code object we did not think of would let a program that targets this
harness forge a pass. Programs that stay inside the rules but cheat the tests themselves (an object whose
`__eq__` is always true, a patched builtin the tests call) pass here exactly as in the reference harness.

Statuses: `passed` (ran to the end), `failed` (an assertion, exception, syntax error, denied operation or an
exit before the end), `timeout` (wall clock or CPU limit), `memory` (MemoryError or killed near the memory
limit), `error` (the sandbox itself could not run the program: that is our problem, not the candidate's).
`detail` is the last line of the program's stderr, at most 300 characters: for people reading label caches,
not for training data (`reason` maps a result to a fixed vocabulary for that).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "memory", "error")
REASONS = (
    "passed", "assertion", "syntax", "exception", "early-exit", "exit-status", "signal", "file-size",
    "forbidden-syscall", "timeout", "memory", "sandbox-error",
)  # fmt: skip
NOBODY = 65534  # uid and gid the program runs under when we are root
_BOOT_FAILED = 97  # exit code of the boot code when a layer it needs could not be set up
_STDERR_TAIL = 4096
_DETAIL_CHARS = 300
_FSIZE_MB = 16  # largest file (stderr included) the program may write
_TMPFS_MB = 64  # the program's cwd under bubblewrap: all its files together
_STATUS_CAP = 1 << 16  # bytes of the status pipe we read
_EARLY_EXIT = "exited before the end of the program"

_log = logging.getLogger(__name__)
_warned = threading.Event()


@dataclass(frozen=True)
class ExecResult:
    status: str  # one of STATUSES
    detail: str  # last line of stderr (<= 300 chars), or why it was killed
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> ExecResult:
    """Run `source` as `__main__` in a sandboxed fresh interpreter; passed only when it ran to its end."""
    return _run(source, timeout_s, memory_mb)[0]


def run_many(
    sources: Sequence[str],
    *,
    timeout_s: float,
    memory_mb: int,
    workers: int = 2,
    on_result: Callable[[int, ExecResult], None] | None = None,
    desc: str | None = None,
) -> list[ExecResult]:
    """`run_program` over many sources, `workers` at a time; results in input order.

    `on_result(index, result)` is called (from this thread) as each finishes, so a caller can persist
    labels incrementally; `desc` shows a progress bar with ETA.
    """
    results: list[ExecResult | None] = [None] * len(sources)
    bar = None
    if desc is not None:
        from tqdm import tqdm

        bar = tqdm(total=len(sources), desc=desc, unit="prog", dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {
                pool.submit(run_program, src, timeout_s=timeout_s, memory_mb=memory_mb): i
                for i, src in enumerate(sources)
            }
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if on_result is not None:
                    on_result(i, results[i])
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]


def layers() -> dict[str, object]:
    """The isolation layers a program gets here (runs one empty program); `missing` names those absent."""
    result, active = _run("", 10.0, 512)
    if not result.passed or active is None:
        return {"error": result.detail}
    return active


def reason(status: str, detail: str) -> str:
    """A result as one word of REASONS: what a finetuning row may keep instead of the free-text `detail`
    (which holds whatever the program printed last)."""
    fixed = {"passed": "passed", "timeout": "timeout", "memory": "memory", "error": "sandbox-error"}
    if status in fixed:
        return fixed[status]
    first = detail.split(":", 1)[0].strip()
    for prefix, word in (
        (_EARLY_EXIT, "early-exit"), ("exit status", "exit-status"), ("killed by signal", "signal"),
        ("wrote a file over", "file-size"), ("killed: forbidden", "forbidden-syscall"),
    ):  # fmt: skip
        if detail.startswith(prefix):
            return word
    if first == "AssertionError":
        return "assertion"
    if first in ("SyntaxError", "IndentationError", "TabError"):
        return "syntax"
    return "exception"


def _run(source: str, timeout_s: float, memory_mb: int) -> tuple[ExecResult, dict[str, object] | None]:
    """Run one program; the result and the layers its boot code reported (None if it never got that far)."""
    workdir = tempfile.mkdtemp(prefix="codepmp-sandbox-")
    token = secrets.token_hex(16)
    drop = NOBODY if os.geteuid() == 0 and (_bwrap() is not None or _others_can_read_python()) else -1
    boot = [sys.executable, "-I", "-B", str(Path(__file__).resolve()), "--boot", workdir]
    read_end, write_end = os.pipe()
    try:
        boot += [str(memory_mb), str(timeout_s), str(write_end), str(drop)]
        cmd = [*_bwrap(), *_bwrap_mounts(workdir), "--", *boot] if _bwrap() is not None else boot
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        start = time.monotonic()
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    pass_fds=(write_end,),
                    start_new_session=True,  # its own process group: killed whole below
                )
            except OSError as exc:
                return ExecResult("error", f"cannot start the interpreter: {exc}", 0.0), None
            os.close(write_end)
            write_end = -1
            timed_out = False
            try:
                proc.communicate(f"{token}\n{source}".encode(errors="surrogateescape"), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
            _kill_group(proc.pid)  # anything it left behind
            seconds = round(time.monotonic() - start, 3)
            tail = _tail(err)
        lines = _status_lines(read_end, token)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        shutil.rmtree(workdir, ignore_errors=True)
    code = proc.returncode
    if _bwrap() is not None and code > 128 and (code - 128) in signal.valid_signals():
        code = 128 - code  # bwrap reports a child killed by signal N as 128 + N
    active = None
    if "layers" in lines:
        active = json.loads(lines["layers"])
        active["missing"] = _missing(active)
        if active["missing"] and not _warned.is_set():
            _warned.set()
            _log.warning("sandbox: running candidates WITHOUT %s on this machine", ", ".join(active["missing"]))
    if "error" in lines or (active is None and not timed_out):  # killed for time while booting: a timeout
        why = lines.get("error") or _last_line(tail) or f"exit status {code}"
        return ExecResult("error", why[:_DETAIL_CHARS], seconds), None
    status, detail = _classify(code, timed_out, tail, timeout_s, memory_mb, finished="ok" in lines)
    return ExecResult(status, detail[:_DETAIL_CHARS], seconds), active


def _status_lines(fd: int, token: str) -> dict[str, str]:
    """The boot code's messages (`TOKEN KIND TEXT` lines) from the status pipe, by kind; other text is ignored."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while len(data) < _STATUS_CAP and (chunk := os.read(fd, _STATUS_CAP)):
            data += chunk
    found: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        head, _, rest = line.partition(" ")
        if head == token:
            kind, _, text = rest.partition(" ")
            found.setdefault(kind, text)
    return found


def _missing(active: dict[str, object]) -> list[str]:
    """The layers this machine could not give (names as the module docstring uses them)."""
    missing = []
    if not active.get("namespaces"):
        missing.append("namespaces (install bubblewrap)")
    if active.get("uid") == 0 or active.get("capabilities"):
        missing.append("unprivileged uid")
    if int(active.get("landlock_abi") or 0) < 6:
        missing.append(f"Landlock ABI 6 (have {active.get('landlock_abi')})")
    if not active.get("seccomp"):
        missing.append("seccomp")
    return missing


@functools.cache
def _bwrap() -> tuple[str, ...] | None:
    """The bubblewrap command line (namespaces, no mounts yet) when it works here, else None.

    As root bwrap needs no user namespace, so uid 65534 in the sandbox is uid 65534 on the host too (a user
    namespace would map it to host root, the owner of every root file bound into the sandbox). Probed once.
    """
    path = shutil.which("bwrap")
    if path is None:
        return None
    cmd = [path, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    cmd += ["--die-with-parent", "--new-session"] + ([] if os.geteuid() == 0 else ["--unshare-user"])
    # probed on a program dir like a real one: a tmpfs on the temp root itself would hide a venv beneath it
    workdir = tempfile.mkdtemp(prefix="codepmp-sandbox-")
    probe = [*cmd, *_bwrap_mounts(workdir), "--", sys.executable, "-I", "-c", "pass"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return tuple(cmd) if ok else None


def _bwrap_mounts(workdir: str) -> list[str]:
    """The file system the program sees: system dirs and the interpreter read-only, its cwd a sized tmpfs."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    binds = dict.fromkeys((sys.base_prefix, sys.prefix, str(Path(__file__).resolve())))
    parents = dict.fromkeys(str(p) for path in [*binds, workdir] for p in reversed(Path(path).parents) if p != p.parent)
    for parent in parents:  # bwrap would make them 0700: closed to uid 65534
        args += ["--perms", "0755", "--dir", parent]
    for path in binds:
        args += ["--ro-bind", path, path]
    for etc in ("/etc/ld.so.cache", "/etc/localtime"):
        args += ["--ro-bind-try", etc, etc]
    return [*args, "--dev", "/dev", "--size", str(_TMPFS_MB << 20), "--tmpfs", workdir, "--chdir", workdir]


def _others_can_read_python() -> bool:
    """Whether uid 65534 could import the stdlib and site-packages here (without bwrap, which rebinds them)."""
    import sysconfig

    for lib in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}:
        path = Path(lib)
        for part in [path, *path.parents]:
            with contextlib.suppress(OSError):
                if not part.stat().st_mode & stat.S_IXOTH:
                    return False
    return True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(handle) -> str:
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - _STDERR_TAIL))
    return handle.read().decode("utf-8", "replace")


def _last_line(tail: str) -> str:
    lines = [line for line in tail.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _classify(
    code: int, timed_out: bool, tail: str, timeout_s: float, memory_mb: int, *, finished: bool = False
) -> tuple[str, str]:
    """(status, detail) of a run: `finished` says the boot code's end-of-program token arrived."""
    last = _last_line(tail)
    if timed_out:
        return "timeout", f"killed after {timeout_s:g}s wall clock"
    if code == 0 and finished:
        return "passed", ""
    if code == -signal.SIGXCPU:
        return "timeout", "killed at the CPU-time limit"
    if "MemoryError" in last or code == -signal.SIGKILL:
        return "memory", last or f"killed (SIGKILL) at the {memory_mb} MB limit"
    if code == -signal.SIGXFSZ:
        return "failed", f"wrote a file over {_FSIZE_MB} MB"
    if code == -signal.SIGSYS:
        return "failed", "killed: forbidden system call ABI"
    if code < 0:
        return "failed", f"killed by signal {signal.Signals(-code).name}" + (f": {last}" if last else "")
    if code == 0:
        return "failed", f"{_EARLY_EXIT} (status 0)" + (f": {last}" if last else "")
    return "failed", last or f"exit status {code}"


# --------------------------------------------------------------------------- boot (runs in the sandbox)

_SYS_X86_64 = {
    "socket": 41, "clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "io_uring_setup": 425, "capget": 125,
    "capset": 126, "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "prlimit64": 302, "setpriority": 141, "sched_setaffinity": 203, "sched_setparam": 142,
    "sched_setscheduler": 144, "sched_setattr": 314, "ptrace": 101, "process_vm_readv": 310,
    "process_vm_writev": 311, "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438, "ioprio_set": 251,
    "migrate_pages": 256, "move_pages": 279, "kcmp": 312, "process_madvise": 440, "chmod": 90, "fchmod": 91,
    "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260, "utime": 132,
    "utimes": 235, "futimesat": 261, "utimensat": 280, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
    "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "setxattrat": 463, "removexattrat": 466,
}  # fmt: skip
_SYS_AARCH64 = {
    "socket": 198, "clone": 220, "clone3": 435, "io_uring_setup": 425, "capget": 90, "capset": 91, "kill": 129,
    "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240, "prlimit64": 261,
    "setpriority": 140, "sched_setaffinity": 122, "sched_setparam": 118, "sched_setscheduler": 119,
    "sched_setattr": 274, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_open": 434,
    "pidfd_send_signal": 424, "pidfd_getfd": 438, "ioprio_set": 30, "migrate_pages": 238, "move_pages": 239,
    "kcmp": 272, "process_madvise": 440, "fchmod": 52, "fchmodat": 53, "fchmodat2": 452, "fchownat": 54,
    "fchown": 55, "utimensat": 88, "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14,
    "lremovexattr": 15, "fremovexattr": 16, "setxattrat": 463, "removexattrat": 466,
}  # fmt: skip
# Calls that act on another process: refused outright, or allowed on this process only (first argument 0 or
# our pid; setpriority: PRIO_PROCESS and who 0 or our pid). Kernel-enforced, so this holds without bubblewrap
# and as uid 0, where the owner checks would let root reach every root process.
_NO_OTHERS = ("tkill", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_send_signal", "pidfd_getfd",
              "ioprio_set", "migrate_pages", "move_pages", "kcmp", "process_madvise")  # fmt: skip
# Refused while the program still runs as uid 0 (no bubblewrap here): it owns every root file, and Landlock has
# no right for metadata. (Unprivileged, the owner checks and the read-only mounts stop these instead.)
_METADATA = ("chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat", "utime", "utimes",
             "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
             "fremovexattr", "setxattrat", "removexattrat")  # fmt: skip
_SELF_ONLY = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "prlimit64", "sched_setaffinity",
              "sched_setparam", "sched_setscheduler", "sched_setattr", "pidfd_open")  # fmt: skip
_AUDIT_ARCH = {"x86_64": (0xC000003E, _SYS_X86_64), "aarch64": (0xC00000B7, _SYS_AARCH64)}
_DENIED_EVENTS = frozenset({"sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents"})


def _set_limits(memory_mb: int, timeout_s: float, seccomp: bool) -> None:
    """Hard limits the program cannot raise. The CPU limit's soft value sends SIGXCPU (reported as a timeout)
    a second before the hard one kills; it only matters for threads, the wall clock stops a single one first."""
    import math
    import resource

    cpu = math.ceil(timeout_s) + 1
    limits = {
        "RLIMIT_AS": (memory_mb * 1024 * 1024,) * 2,
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_FSIZE": (_FSIZE_MB * 1024 * 1024,) * 2,
        "RLIMIT_NOFILE": (64, 64),
        "RLIMIT_CORE": (0, 0),
    }
    if not seccomp and os.getuid() != 0:  # no fork filter here: forbid new tasks (threads too) instead
        limits["RLIMIT_NPROC"] = (1, 1)
    for name, (soft, hard) in limits.items():
        if hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (soft, hard))


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.restype = ctypes.c_int
    return libc


def _prctl(libc, *args: int) -> int:
    import ctypes

    result = libc.prctl(*[ctypes.c_ulong(a) for a in args], *[ctypes.c_ulong(0)] * (5 - len(args)))
    if result < 0:
        raise OSError(ctypes.get_errno(), f"prctl{args}")
    return result


def _drop_privileges(libc, workdir: str, uid: int) -> None:
    """Root -> no capabilities, and `uid`/`uid` with no groups when uid >= 0 (the cwd is handed over first).
    The bounding set is emptied first (that needs CAP_SETPCAP); setresuid to non-root then clears the rest,
    and where root has to stay uid 0 (see the module docstring) capset empties every set."""
    import ctypes
    import errno
    import platform

    if uid >= 0:
        os.chown(workdir, uid, uid)
    for cap in range(64):
        try:
            _prctl(libc, 24, cap)  # PR_CAPBSET_DROP
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: past the last capability this kernel knows
                raise
            break
    _prctl(libc, 47, 4)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    if uid >= 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif platform.machine() in _AUDIT_ARCH:
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        if libc.syscall(_AUDIT_ARCH[platform.machine()][1]["capset"], header, (ctypes.c_uint32 * 6)()):
            raise OSError(ctypes.get_errno(), "capset")


def _capabilities(libc) -> int:
    """Effective | permitted capability bits of this process (capget), -1 where we lack the syscall number."""
    import ctypes
    import platform

    arch = _AUDIT_ARCH.get(platform.machine())
    if arch is None:
        return -1
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # 2 x {effective, permitted, inheritable}
    if libc.syscall(arch[1]["capget"], header, data):
        raise OSError(ctypes.get_errno(), "capget")
    return data[0] | data[1] | (data[3] | data[4]) << 32


def _landlock(libc, workdir: str) -> int:
    """Writes beneath `workdir` (no device nodes) and to /dev/null only; no ioctl on devices; TCP and outside
    signals denied where the ABI allows. Returns the Landlock ABI version in force, 0 when the kernel has none.
    """
    import ctypes

    create, add_rule, restrict = 444, 445, 446  # the same numbers on x86_64 and aarch64
    abi = libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi <= 0:
        return 0
    write_file, make_char, make_block, truncate, ioctl_dev = 1 << 1, 1 << 6, 1 << 11, 1 << 14, 1 << 15
    handled = write_file | sum(1 << b for b in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/...
    handled |= (1 << 13 if abi >= 2 else 0) | (truncate if abi >= 3 else 0) | (ioctl_dev if abi >= 5 else 0)

    class RulesetAttr(ctypes.Structure):
        _fields_ = (("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64))

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = (("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))

    attr = RulesetAttr(handled, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    in_workdir = handled & ~(make_char | make_block | ioctl_dev)
    for path, allowed in ((workdir, in_workdir), ("/dev/null", write_file | (truncate if abi >= 3 else 0))):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(allowed, fd)
        if libc.syscall(add_rule, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)):
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path})")
        os.close(fd)
    if libc.syscall(restrict, ctypes.c_int(ruleset), ctypes.c_uint32(0)):
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)
    return abi


def _seccomp(libc, root: bool) -> bool:
    """Install the syscall filter described in the module docstring (`root`: the metadata calls too); False on
    an architecture we lack."""
    import ctypes
    import errno
    import platform

    arch = _AUDIT_ARCH.get(platform.machine())
    if arch is None:
        return False
    audit_arch, nr = arch
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    clone_thread = 0x00010000
    prog: list[tuple[int, int, int, int]] = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if audit_arch == _AUDIT_ARCH["x86_64"][0]:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill)]  # x32 syscalls
    for name in ("socket", "fork", "vfork", "io_uring_setup", *_NO_OTHERS, *(_METADATA if root else ())):
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, eperm)]
    pid = os.getpid()
    only_self = [(jeq, 2, 0, 0), (jeq, 1, 0, pid), (ret, 0, 0, eperm), (ret, 0, 0, allow)]  # A = the pid argument
    for name in _SELF_ONLY:
        prog += [(jeq, 0, 5, nr[name]), (ld, 0, 0, 16), *only_self]  # args[0], low 32 bits (pid_t)
    prog += [(jeq, 0, 7, nr["setpriority"]), (ld, 0, 0, 16), (jeq, 0, 3, 0), (ld, 0, 0, 24), *only_self]
    prog += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, enosys)]
    prog += [(jeq, 0, 3, nr["clone"]), (ld, 0, 0, 16), (jset, 1, 0, clone_thread), (ret, 0, 0, eperm)]
    prog += [(ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = (("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32))

    class Program(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter)))

    filters = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
    fprog = Program(len(prog), filters)
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    return True


def _isolate(workdir: str, memory_mb: int, timeout_s: float, drop_to: int) -> dict[str, object]:
    """Every layer this process can set up, in order (see the module docstring); what is in force."""
    libc = _libc()
    _prctl(libc, 38, 1)  # PR_SET_NO_NEW_PRIVS: nothing exec'd later gains privileges
    if os.geteuid() == 0:
        _drop_privileges(libc, workdir, drop_to)
    active: dict[str, object] = {
        "namespaces": "bwrap" if os.getpid() <= 3 else None,  # pid 1 is bwrap's init in a new pid namespace
        "uid": os.getuid(),
        "gid": os.getgid(),
        "capabilities": _capabilities(libc),
        "no_new_privs": True,
        "landlock_abi": _landlock(libc, workdir),
        "seccomp": _seccomp(libc, root=os.getuid() == 0),
        "audit_hook": True,
        "rlimit_as_mb": memory_mb,
    }
    _set_limits(memory_mb, timeout_s, bool(active["seccomp"]))  # last: the steps above need fds and memory
    return active


def _read_stdin() -> tuple[str, str]:
    """(token, source) from the parent, read without a Python buffer; stdin is /dev/null afterwards."""
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    token, _, source = b"".join(chunks).decode("utf-8", "surrogateescape").partition("\n")
    return token, source


def _compile(program: str, source: str, token: str, status_fd: int):
    """The program's code with the end-of-program line appended. The source is compiled alone first, so a
    syntax error is reported against it and nothing it leaves open (a string, a bracket, a backslash) can
    swallow the appended line."""
    compile(source, program, "exec", dont_inherit=True)
    done = f"{token} ok\n".encode()
    ending = f"\n__import__('os').write({status_fd}, {done!r})\n__import__('os')._exit(0)\n"
    return compile(source + ending, program, "exec", dont_inherit=True)


def _audit_hook(module_globals: dict) -> Callable[[str, tuple], None]:
    """Refuse the routes from the program to its own code object (and so to the token), and a trace
    function's jump over the program's last lines. Installed last: hooks cannot be removed."""
    proc_visible = os.path.exists("/proc/self")

    def hook(event: str, args: tuple) -> None:
        if event in _DENIED_EVENTS or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "object.__getattr__" and args[1] == "f_code":
            frame = args[0]
            if frame.f_globals is module_globals and frame.f_locals is module_globals:
                # ValueError: what logging, typing and namedtuple already expect from frame lookups
                raise ValueError("sandbox: the program's own code object is not readable")
        elif event == "open" and proc_visible and isinstance(args[0], str | bytes):
            path = os.fsdecode(args[0])
            if os.path.realpath(path).startswith("/proc/") or path.startswith("/proc/"):
                raise PermissionError(f"sandbox: {path} is not readable")

    return hook


def _boot(argv: list[str]) -> None:
    """Lock this interpreter down, then run the program as `__main__` (see the module docstring)."""
    import types

    workdir, memory_mb, timeout_s = argv[0], int(argv[1]), float(argv[2])
    status_fd, drop_to = int(argv[3]), int(argv[4])
    token, source = _read_stdin()
    secret = [token]
    del token
    program = os.path.join(workdir, "program.py")
    try:
        Path(program).write_text(source, encoding="utf-8", errors="surrogateescape")
        active = _isolate(workdir, memory_mb, timeout_s, drop_to)
    except Exception as exc:
        os.write(status_fd, f"{secret[0]} error cannot set up isolation: {exc}\n".encode())
        os._exit(_BOOT_FAILED)
    os.write(status_fd, f"{secret[0]} layers {json.dumps(active)}\n".encode())
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # the program imports its own copy, every use of which the hook refuses
    module = types.ModuleType("__main__")
    module.__file__ = program
    module.__builtins__ = __builtins__  # type: ignore[attr-defined]
    sys.modules["__main__"] = module
    sys.argv = [program]
    sys.path[0:0] = [workdir]
    sys.addaudithook(_audit_hook(module.__dict__))
    exec(_compile(program, source, secret.pop(), status_fd), module.__dict__)


if __name__ == "__main__" and sys.argv[1:2] == ["--boot"]:
    _boot(sys.argv[2:])
