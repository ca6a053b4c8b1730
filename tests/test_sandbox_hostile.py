"""Hostile candidates: each tries one way out of the sandbox (files, metadata, devices, network, other
processes, resources, output floods, early exits, forged statuses) and must be contained AND not pass.

All cases run once, two at a time, in a module fixture (the suite takes seconds); each test then asserts
the case's own effect on the host (a canary file untouched, this process's rlimits unchanged, a victim
process alive, no device node) and its status. As root (like CI) this exercises the uid drop; a second test
reruns a handful as uid 65534 (an unprivileged developer), through bubblewrap + setpriv when we are root.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sdk import humaneval as he
from sdk.sandbox import ExecResult, layers, reason, run_many

REPO = Path(__file__).resolve().parents[1]
LIMITS = {"timeout_s": 3, "memory_mb": 256}
SECRET = f"CANARY-{secrets.token_hex(8)}"


@dataclass
class Host:
    """What the cases aim at, outside the sandbox."""

    root: Path
    canary: Path
    victim: subprocess.Popen
    server: socket.socket
    rlimits: dict[int, tuple[int, int]] = field(default_factory=dict)
    nice: int = 0
    affinity: set[int] = field(default_factory=set)

    @property
    def fmt(self) -> dict[str, object]:
        return {
            "canary": str(self.canary), "root": str(self.root), "me": os.getpid(), "victim": self.victim.pid,
            "port": self.server.getsockname()[1], "secret": SECRET, "repo": str(REPO),
        }  # fmt: skip


@dataclass(frozen=True)
class Case:
    source: str  # formatted with Host.fmt
    statuses: tuple[str, ...] = ("failed",)
    detail: str | None = None  # a substring the detail must hold
    humaneval: bool = False  # `source` is a completion of HumanEval/2, run through the real harness


def _canary_intact(host: Host) -> None:
    st = host.canary.stat()
    assert host.canary.read_text() == SECRET
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert (st.st_uid, st.st_gid) == (0, 0) or os.geteuid() != 0
    assert st.st_mtime == 1_000_000_000 and st.st_nlink == 1
    assert os.listxattr(host.canary) == []
    assert sorted(p.name for p in host.root.iterdir()) == ["canary.txt"]


def _this_process_untouched(host: Host) -> None:
    assert {r: resource.getrlimit(r) for r in host.rlimits} == host.rlimits
    assert os.getpriority(os.PRIO_PROCESS, 0) == host.nice
    assert os.sched_getaffinity(0) == host.affinity


def _victim_alive(host: Host) -> None:
    assert host.victim.poll() is None
    assert os.getpriority(os.PRIO_PROCESS, host.victim.pid) == host.nice
    assert resource.prlimit(host.victim.pid, resource.RLIMIT_NOFILE) == host.rlimits[resource.RLIMIT_NOFILE]


def _nothing_connected(host: Host) -> None:
    host.server.settimeout(0.05)
    with pytest.raises(TimeoutError):
        host.server.accept()


def _detail_has_no_host_text(result: ExecResult) -> None:
    readme = (REPO / "README.md").read_text().strip().splitlines()[0]
    assert SECRET not in result.detail and "root:" not in result.detail and readme not in result.detail


CHECKS: dict[str, Callable[[Host], None]] = {
    "files": _canary_intact, "process": _this_process_untouched, "victim": _victim_alive, "net": _nothing_connected,
}  # fmt: skip
ASSERT_FAILS = "\nassert False, 'the checks fail'\n"

CASES: dict[str, tuple[str, Case]] = {
    # files: write, replace, remove, link or read something outside the cwd
    "write-outside": ("files", Case("open({canary!r}, 'w').write('pwned')\n")),
    "append-outside": ("files", Case("open({canary!r}, 'a').write('pwned')\n")),
    "truncate-outside": ("files", Case("import os\nos.truncate({canary!r}, 0)\n")),
    "remove-outside": ("files", Case("import os\nos.remove({canary!r})\n")),
    "rename-outside": ("files", Case("import os\nos.rename({canary!r}, {canary!r} + '.moved')\n")),
    "new-file-outside": ("files", Case("open({root!r} + '/new.txt', 'w').write('x')\n")),
    "symlink-escape": ("files", Case("import os\nos.symlink({canary!r}, 'l')\nopen('l', 'w').write('pwned')\n")),
    "hardlink-escape": ("files", Case("import os\nos.link({canary!r}, 'h')\nopen('h', 'w').write('pwned')\n")),
    "read-canary-into-detail": ("files", Case("raise SystemExit(open({canary!r}).read())\n")),
    "read-shadow-into-detail": ("files", Case("raise SystemExit(open('/etc/shadow').read())\n")),
    "read-repo-into-detail": ("files", Case("raise SystemExit(open({repo!r} + '/README.md').read()[:200])\n")),
    "list-root-home": ("files", Case("import os\nraise SystemExit(str(os.listdir('/root/.ssh')))\n")),
    # metadata outside the cwd (Landlock has no right for these: uid + read-only mounts stop them)
    "chmod-outside": ("files", Case("import os\nos.chmod({canary!r}, 0o777)\n")),
    "chown-outside": ("files", Case("import os\nos.chown({canary!r}, 65534, 65534)\n")),
    "utime-outside": ("files", Case("import os\nos.utime({canary!r}, (0, 0))\n")),
    "setxattr-outside": ("files", Case("import os\nos.setxattr({canary!r}, 'user.pwned', b'1')\n")),
    "chmod-dev-null": ("files", Case("import os\nos.chmod('/dev/null', 0o600)\n")),
    "chmod-interpreter": ("files", Case("import os, sys\nos.chmod(os.path.realpath(sys.executable), 0o777)\n")),
    # device nodes
    "mknod-kmsg": ("files", Case("import os\nos.mknod('kmsg', 0o600 | 0o020000, os.makedev(1, 11))\n")),
    "mknod-block": ("files", Case("import os\nos.mknod('sda', 0o600 | 0o060000, os.makedev(8, 0))\n")),
    "write-dev-kmsg": ("files", Case("open('/dev/kmsg', 'w').write('pwned')\n")),
    "read-dev-mem": ("files", Case("open('/dev/mem', 'rb').read(1)\n")),
    # network
    "tcp-connect": ("net", Case("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")),
    "udp-send": ("net", Case("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n")),
    "abstract-unix": ("net", Case("import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0codepmp')\n")),
    "unix-socket-file": ("files", Case("import socket\nsocket.socket(socket.AF_UNIX).bind({root!r} + '/s')\n")),
    # other processes: the evaluator (this test process) and a victim of the same uid
    "prlimit-evaluator": ("process", Case("import resource\nresource.prlimit({me}, resource.RLIMIT_NOFILE, (8, 8))\n")),
    "prlimit-ppid": ("process", Case(
        "import os, resource\nresource.prlimit(os.getppid(), resource.RLIMIT_AS, (1, 1))\n"
    )),
    "prlimit-victim": ("victim", Case("import resource\nresource.prlimit({victim}, resource.RLIMIT_NOFILE, (8, 8))\n")),
    "setpriority-evaluator": ("process", Case("import os\nos.setpriority(os.PRIO_PROCESS, {me}, 19)\n")),
    "setpriority-victim": ("victim", Case("import os\nos.setpriority(os.PRIO_PROCESS, {victim}, 19)\n")),
    "affinity-evaluator": ("process", Case("import os\nos.sched_setaffinity({me}, {{0}})\n")),
    "kill-victim": ("victim", Case("import os\nos.kill({victim}, 9)\n")),
    "kill-ppid": ("victim", Case("import os\nos.kill(os.getppid(), 9)\nos.kill(1, 9)\n")),
    "kill-everything": ("victim", Case("import os\nos.kill(-1, 9)\n" + ASSERT_FAILS)),
    "ptrace-victim": ("victim", Case("import ctypes\nctypes.CDLL(None).ptrace(16, {victim}, 0, 0)\n")),
    "setuid-root": ("process", Case("import os\nos.setuid(0)\n")),
    "chroot": ("process", Case("import os\nos.chroot('.')\n")),
    # resources
    "memory-bomb": ("process", Case("b = []\nwhile True:\n    b.append(bytearray(10**7))\n", ("memory",))),
    "cpu-loop": ("process", Case("while True:\n    pass\n", ("timeout",))),
    "thread-bomb": ("process", Case(
        "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()\n",
        ("failed", "timeout", "memory"),
    )),
    "fork-bomb": ("process", Case("import os\nwhile True:\n    os.fork()\n", detail="Operation not permitted")),
    "big-file": ("files", Case("open('big', 'wb').write(bytes(64 << 20))\n", ("failed", "memory"))),
    "fd-exhaustion": ("process", Case("fs = [open('f%d' % i, 'w') for i in range(10000)]\n", detail="Too many open")),
    "disk-fill": ("files", Case(
        "i = 0\nwhile True:\n    open(f'f{{i}}', 'wb').write(bytes(8 << 20))\n    i += 1\n", detail="No space left"
    )),
    # output floods
    "stdout-flood": ("process", Case("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", ("timeout",))),
    "stderr-flood": ("process", Case("import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n")),
    "status-pipe-flood": ("process", Case(
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'x' * 65536)\n    except OSError:\n"
        "        pass\n" + ASSERT_FAILS, ("failed", "timeout"),
    )),
    # early exits, every form
    "systemexit-0": ("process", Case("raise SystemExit(0)" + ASSERT_FAILS, detail="before the end")),
    "sys-exit-none": ("process", Case("import sys\nsys.exit()" + ASSERT_FAILS, detail="before the end")),
    "os-exit-0": ("process", Case("import os\nos._exit(0)" + ASSERT_FAILS, detail="before the end")),
    "quit-builtin": ("process", Case("quit()" + ASSERT_FAILS, detail="before the end")),
    "atexit-exit-0": ("process", Case("import atexit, os\natexit.register(os._exit, 0)" + ASSERT_FAILS)),
    "excepthook-exit-0": ("process", Case("import os, sys\nsys.excepthook = lambda *a: os._exit(0)" + ASSERT_FAILS)),
    "exit-in-finally": ("process", Case("import sys\ntry:\n    assert False\nfinally:\n    sys.exit(0)\n")),
    "signal-to-self": ("process", Case("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)" + ASSERT_FAILS)),
    "sigkill-to-self": ("process", Case("import os\nos.kill(os.getpid(), 9)" + ASSERT_FAILS, ("failed", "memory"))),
    "alarm-handler-exit": ("process", Case(
        "import os, signal, time\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\nsignal.alarm(1)\n"
        "time.sleep(2)" + ASSERT_FAILS, detail="before the end",
    )),
    "thread-exits-process": ("process", Case(
        "import os, threading, time\nthreading.Thread(target=os._exit, args=(0,)).start()\ntime.sleep(1)"
        + ASSERT_FAILS,
        detail="before the end",
    )),
    "thread-keeps-running": ("process", Case(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()" + ASSERT_FAILS, ("timeout",)
    )),
    "settrace-jumps-checks": ("process", Case(
        "import sys\ndef jump(frame, event, arg):\n    if event == 'line' and frame.f_lineno == 8:\n"
        "        frame.f_lineno = 9\n    return jump\nsys.settrace(jump)\nsys._getframe().f_trace = jump\n"
        "assert False\npass\n", detail="sys.settrace is not allowed",
    )),
    # HumanEval: the same through the real harness (prompt + completion + test + check(entry_point))
    "he-body-systemexit-0": ("process", Case("    raise SystemExit(0)\n", humaneval=True)),
    "he-body-os-exit-0": ("process", Case("    import os\n    os._exit(0)\n", humaneval=True)),
    "he-top-level-exit": ("process", Case("    return 0.0\n\nimport sys\nsys.exit(0)\n", humaneval=True)),
    "he-redefine-check": ("process", Case("    return 0.0\n\ndef check(candidate):\n    pass\n", humaneval=True)),
    "he-atexit-exit-0": ("process", Case(
        "    return 0.0\n\nimport atexit, os\natexit.register(os._exit, 0)\n", humaneval=True
    )),
    # forged statuses
    "print-status-line": ("process", Case(
        "import sys\nprint('codepmp-sandbox: cannot set up isolation: x', file=sys.stderr)\nsys.exit(97)\n"
    )),
    "guess-token-on-every-fd": ("process", Case(
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32 + b' ok\\n')\n"
        "    except OSError:\n        pass\nos._exit(0)\n", detail="before the end",
    )),
    "read-own-code-constants": ("process", Case(
        "import sys\nprint(sys._getframe().f_code.co_consts)" + ASSERT_FAILS, detail="not readable"
    )),
    "signal-handler-frame": ("process", Case(
        "import os, signal\ndef grab(sig, frame):\n    print(frame.f_code.co_consts)\n"
        "signal.signal(signal.SIGUSR1, grab)\nos.kill(os.getpid(), signal.SIGUSR1)" + ASSERT_FAILS,
        detail="not readable",
    )),
    "traceback-frame": ("process", Case(
        "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    print(e.__traceback__.tb_frame.f_code.co_consts)"
        + ASSERT_FAILS, detail="not readable",
    )),
    "gc-walk": ("process", Case("import gc\nprint(len(gc.get_objects()))" + ASSERT_FAILS, detail="gc.get_objects")),
    "ctypes-memory": ("process", Case("import ctypes\nprint(ctypes.string_at(id(0), 8))" + ASSERT_FAILS)),
    "proc-self-mem": ("process", Case("open('/proc/self/mem', 'rb')" + ASSERT_FAILS)),
    "program-file-has-no-token": ("process", Case(
        "import os, re\nsrc = open('program.py').read()\nassert not re.search('[0-9a-f]{{32}} ok', src)\n"
        "for fd in range(3, 64):\n    try:\n        os.write(fd, src.encode())\n    except OSError:\n        pass\n"
        "os._exit(0)\n",
        detail="before the end",
    )),
}  # fmt: skip


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    root = tmp_path_factory.mktemp("outside")
    root.chmod(0o755)
    canary = root / "canary.txt"
    canary.write_text(SECRET)
    canary.chmod(0o644)
    os.utime(canary, (1_000_000_000, 1_000_000_000))
    victim = subprocess.Popen(["sleep", "600"])
    server = socket.create_server(("127.0.0.1", 0))
    limits = [resource.RLIMIT_NOFILE, resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE]
    state = Host(root, canary, victim, server, {r: resource.getrlimit(r) for r in limits})
    state.nice, state.affinity = os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0)
    try:
        yield state
    finally:
        for r, value in state.rlimits.items():  # put things back, should a case have escaped
            resource.setrlimit(r, value)
        victim.kill()
        victim.wait()
        server.close()


@pytest.fixture(scope="module")
def results(host) -> dict[str, ExecResult]:
    active = layers()
    if active.get("landlock_abi", 0) < 6 and not active.get("namespaces"):
        pytest.skip(f"kill(-1) and friends would reach this machine: no signal scoping nor pid namespace ({active})")
    problem = next(p for p in he.load_problems(3) if p["task_id"] == "HumanEval/2")
    sources = [
        he.program(problem, case.source) if case.humaneval else case.source.format(**host.fmt)
        for _, case in CASES.values()
    ]
    start = time.monotonic()
    out = run_many(sources, workers=2, **LIMITS)
    assert time.monotonic() - start < 90, "the hostile suite should take well under two minutes"
    return dict(zip(CASES, out, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case_is_contained_and_does_not_pass(name, host, results):
    target, case = CASES[name]
    result = results[name]
    CHECKS[target](host)
    assert not result.passed
    assert result.status in case.statuses, result
    if case.detail is not None:
        assert case.detail in result.detail, result
    assert len(result.detail) <= 300
    _detail_has_no_host_text(result)
    assert reason(result.status, result.detail) != "passed"


def test_no_device_node_or_stray_file_was_left_on_the_host(host, results):
    assert results  # every case has run
    assert not list(Path("/tmp").glob("codepmp-sandbox-*/kmsg"))
    assert not (host.root / "new.txt").exists() and not (host.root / "s").exists()


@pytest.mark.parametrize(
    "completion",
    [
        "    class Same(float):\n        def __eq__(self, other):\n            return True\n"
        "        def __sub__(self, other):\n            return 0.0\n    return Same()\n",
        "    import builtins\n    builtins.abs = lambda x: 0\n    return 0.5\n",
    ],
    ids=["always-equal-result", "patched-builtin"],
)
@pytest.mark.xfail(strict=True, reason="cheating the tests from inside passes, as in the reference harness")
def test_semantic_hacks_are_not_caught(completion):
    problem = next(p for p in he.load_problems(3) if p["task_id"] == "HumanEval/2")
    assert not he.check([problem], [completion], **LIMITS)[0].passed


def as_nobody(argv: list[str]) -> list[str] | None:
    """`argv` as uid/gid 65534 with no capabilities: as is when we are not root; as root through setpriv
    inside a bubblewrap view where the interpreter, venv and repo are reachable (their parents, e.g. a 0700
    /root, are replaced by 0755 tmpfs). None when neither bwrap nor setpriv is here."""
    if os.geteuid() != 0:
        return argv
    bwrap, setpriv = shutil.which("bwrap"), shutil.which("setpriv")
    if bwrap is None or setpriv is None:
        return None
    needed = [Path(p).resolve() for p in dict.fromkeys((sys.base_prefix, sys.prefix, str(REPO)))]
    cmd = [bwrap, "--dev-bind", "/", "/"]
    closed = []
    for path in needed:
        for parent in reversed(path.parents):
            if parent != parent.parent and not parent.stat().st_mode & stat.S_IXOTH:
                closed.append(parent)
                break
    for top in dict.fromkeys(closed):
        cmd += ["--perms", "0755", "--tmpfs", str(top)]
        for path in needed:
            if top in path.parents:
                between = [p for p in reversed(path.parents) if top in p.parents]
                for p in between:
                    cmd += ["--perms", "0755", "--dir", str(p)]
                cmd += ["--bind", str(path), str(path)]
    cmd += ["--", setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    return [*cmd, "--inh-caps=-all", "--bounding-set=-all", "--", *argv]


NOBODY_SCRIPT = """
import json, os, sys
from sdk.sandbox import layers, run_many
cases = json.loads(sys.argv[1])
out = run_many(list(cases.values()), timeout_s=3, memory_mb=256)
results = {n: [r.status, r.detail] for n, r in zip(cases, out)}
print(json.dumps({"uid": os.getuid(), "layers": layers(), "results": results}))
"""


def test_unprivileged_user_gets_the_same_containment(host):
    """(Not prlimit-ppid: unprivileged, the parent it sees is bwrap's init inside its own user namespace.)"""
    names = ["systemexit-0", "os-exit-0", "mknod-kmsg", "chmod-outside", "write-outside", "prlimit-evaluator",
             "kill-victim", "tcp-connect", "print-status-line", "read-own-code-constants",
             "he-body-systemexit-0"]  # fmt: skip
    problem = next(p for p in he.load_problems(3) if p["task_id"] == "HumanEval/2")
    cases = {
        n: he.program(problem, CASES[n][1].source) if CASES[n][1].humaneval else CASES[n][1].source.format(**host.fmt)
        for n in names
    }
    cases["ok"] = "assert sum([1, 2]) == 3\n"
    cmd = as_nobody([sys.executable, "-c", NOBODY_SCRIPT, json.dumps(cases)])
    if cmd is None:
        pytest.skip("root without bwrap/setpriv: no way to become uid 65534 here")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["uid"] == 65534 and report["layers"]["uid"] == 65534 and report["layers"]["capabilities"] == 0
    statuses = {n: status for n, (status, _) in report["results"].items()}
    assert statuses.pop("ok") == "passed"
    assert [n for n, s in statuses.items() if s == "passed"] == [], report["results"]
    for target in ("files", "victim", "net", "process"):
        CHECKS[target](host)


def test_without_bubblewrap_root_is_still_contained_by_seccomp_and_landlock(host, monkeypatch):
    """No bwrap: as root the program keeps uid 0 here (/root is 0700), minus every capability; seccomp refuses
    metadata calls and calls on other processes, Landlock writes outside. Only reading host files is open."""
    import sdk.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_bwrap", lambda: None)
    names = ["chmod-outside", "chown-outside", "utime-outside", "setxattr-outside", "chmod-dev-null",
             "write-outside", "mknod-kmsg", "prlimit-evaluator", "setpriority-victim", "affinity-evaluator",
             "kill-victim", "tcp-connect", "systemexit-0", "read-own-code-constants", "proc-self-mem"]  # fmt: skip
    try:
        out = run_many([CASES[n][1].source.format(**host.fmt) for n in names], workers=2, **LIMITS)
    finally:
        os.chmod("/dev/null", 0o666)  # should chmod-dev-null ever get through again
    assert {n: r.status for n, r in zip(names, out, strict=True) if r.passed} == {}
    for target in ("files", "victim", "net", "process"):
        CHECKS[target](host)
    assert stat.S_IMODE(os.stat("/dev/null").st_mode) == 0o666
