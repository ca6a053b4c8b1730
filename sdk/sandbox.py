"""Run untrusted Python (model-written code and its tests) in a fresh, locked-down interpreter.

Candidate code never runs in our process. `run_program` starts `python -I -B sandbox.py --boot PROG` in a new
session with a scrubbed environment, cwd = a fresh temp dir, and kills the whole process group when the time
runs out. Before handing control to the program, the boot code (this file, run as a script: stdlib only)
locks the interpreter down, each layer enforced by the kernel so the program cannot undo it:

- rlimits: address space `memory_mb`, CPU seconds, file size, open files, no core dumps (and, only where
  seccomp is missing and we are not root, RLIMIT_NPROC = 1);
- seccomp: `socket()` (no network, no IPC sockets), `fork`/`vfork`/process-creating `clone` (threads are
  allowed), `clone3` (ENOSYS so libc falls back to `clone`) and `io_uring_setup` fail; other syscall ABIs
  (x32, 32-bit `int 0x80`) kill the process. This also contains a fork bomb when we run as root, where
  RLIMIT_NPROC is not enforced;
- Landlock (Linux >= 5.13, unprivileged): writes only beneath the temp dir (and to /dev/null); from ABI 4
  TCP bind/connect are denied too, from ABI 6 signals and abstract unix sockets cannot reach outside.

Reads are not restricted (the interpreter must load the stdlib from wherever it lives). Layers the kernel
lacks are skipped; `layers()` reports what is active on this machine.

Statuses: `passed` (exit 0), `failed` (non-zero exit: an assertion, exception, syntax error or a denied
operation), `timeout` (wall clock or CPU limit), `memory` (MemoryError or killed near the memory limit),
`error` (the sandbox itself could not run the program: that is our problem, not the candidate's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "memory", "error")
_BOOT_FAILED = 97  # exit code of the boot code when a layer it needs could not be set up
_STDERR_TAIL = 4096
_FSIZE_MB = 16  # largest file (stderr included) the program may write


@dataclass(frozen=True)
class ExecResult:
    status: str  # one of STATUSES
    detail: str  # last line(s) of stderr, or why it was killed
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> ExecResult:
    """Run `source` as `__main__` in a sandboxed fresh interpreter; exit status 0 means passed."""
    workdir = Path(tempfile.mkdtemp(prefix="codepmp-sandbox-"))
    try:
        program = workdir / "program.py"
        program.write_text(source, encoding="utf-8")
        return _run(program, workdir, timeout_s, memory_mb)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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
    """Which isolation layers the boot code manages to set up here (runs one empty program)."""
    workdir = Path(tempfile.mkdtemp(prefix="codepmp-sandbox-"))
    try:
        program = workdir / "program.py"
        program.write_text("", encoding="utf-8")
        result = _run(program, workdir, 10.0, 512, report=True)
        report = workdir / "_layers.json"
        if not result.passed or not report.exists():
            return {"error": result.detail}
        return json.loads(report.read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(program: Path, workdir: Path, timeout_s: float, memory_mb: int, report: bool = False) -> ExecResult:
    cmd = [sys.executable, "-I", "-B", str(Path(__file__).resolve()), "--boot", str(program)]
    cmd += [str(workdir), str(memory_mb), str(timeout_s)] + (["--report"] if report else [])
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
    start = time.monotonic()
    stderr_path = workdir / "_stderr"
    with open(stderr_path, "wb") as err:
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own process group: killed whole below
            )
        except OSError as exc:
            return ExecResult("error", f"cannot start the interpreter: {exc}", 0.0)
        timed_out = False
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            code = proc.wait()
        _kill_group(proc.pid)  # anything it left behind
    seconds = time.monotonic() - start
    tail = _tail(stderr_path)
    return ExecResult(*_classify(code, timed_out, tail, timeout_s, memory_mb), round(seconds, 3))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - _STDERR_TAIL))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""  # the program removed its own stderr file


def _classify(code: int, timed_out: bool, tail: str, timeout_s: float, memory_mb: int) -> tuple[str, str]:
    lines = [line for line in tail.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if timed_out:
        return "timeout", f"killed after {timeout_s:g}s wall clock"
    if code == 0:
        return "passed", ""
    if code == _BOOT_FAILED and last.startswith("codepmp-sandbox:"):
        return "error", last
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
    return "failed", last or f"exit status {code}"


# --------------------------------------------------------------------------- boot (runs in the sandbox)

_SYS_X86_64 = {"socket": 41, "clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "io_uring_setup": 425}
_SYS_AARCH64 = {"socket": 198, "clone": 220, "clone3": 435, "io_uring_setup": 425}
_AUDIT_ARCH = {"x86_64": (0xC000003E, _SYS_X86_64), "aarch64": (0xC00000B7, _SYS_AARCH64)}


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


def _no_new_privs(libc) -> None:
    import ctypes

    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _landlock(libc, workdir: str) -> int:
    """Writes beneath `workdir` (and /dev/null) only; TCP and outside signals denied where the ABI allows.

    Returns the Landlock ABI version in force, 0 when the kernel has none.
    """
    import ctypes

    create, add_rule, restrict = 444, 445, 446  # the same numbers on x86_64 and aarch64
    abi = libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi <= 0:
        return 0
    write_file, truncate = 1 << 1, 1 << 14
    handled = write_file | sum(1 << b for b in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/...
    handled |= (1 << 13 if abi >= 2 else 0) | (truncate if abi >= 3 else 0)  # refer, truncate

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
    for path, allowed in ((workdir, handled), ("/dev/null", write_file | (truncate if abi >= 3 else 0))):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(allowed, fd)
        if libc.syscall(add_rule, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)):
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path})")
        os.close(fd)
    if libc.syscall(restrict, ctypes.c_int(ruleset), ctypes.c_uint32(0)):
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)
    return abi


def _seccomp(libc) -> bool:
    """Install the syscall filter described in the module docstring; False on an architecture we lack."""
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
    for name in ("socket", "fork", "vfork", "io_uring_setup"):
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, eperm)]
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


def _boot(argv: list[str]) -> None:
    """Lock this interpreter down, then run the program as `__main__` (see the module docstring)."""
    program, workdir, memory_mb, timeout_s = argv[0], argv[1], int(argv[2]), float(argv[3])
    try:
        libc = _libc()
        _no_new_privs(libc)
        active: dict[str, object] = {"landlock_abi": _landlock(libc, workdir), "seccomp": _seccomp(libc)}
        _set_limits(memory_mb, timeout_s, bool(active["seccomp"]))  # last: the steps above need fds and memory
    except Exception as exc:
        print(f"codepmp-sandbox: cannot set up isolation: {exc}", file=sys.stderr)
        sys.exit(_BOOT_FAILED)
    if "--report" in argv:
        active["rlimit_as_mb"] = memory_mb
        Path(workdir, "_layers.json").write_text(json.dumps(active))
    import runpy

    sys.argv = [program]
    sys.path[0:0] = [workdir]
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__" and sys.argv[1:2] == ["--boot"]:
    _boot(sys.argv[2:])
