"""The sandbox contains hostile candidates (loops, memory bombs, forks, writes outside, network, signals) and
reports them as failures within their limits, never as a hang and never at our expense."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sdk.sandbox import ExecResult, _classify, layers, run_many, run_program


def test_exit_status_decides_passed_and_failed():
    assert run_program("assert sum([1, 2]) == 3\n").status == "passed"
    failed = run_program("assert 1 == 2, 'one is not two'\n")
    assert failed.status == "failed" and not failed.passed
    assert failed.detail == "AssertionError: one is not two"
    syntax = run_program("def f(:\n    pass\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.detail
    assert run_program("import sys; sys.exit(3)\n").detail == "exit status 3"


def test_isolation_layers_are_active_here():
    active = layers()
    assert active["seccomp"] is True
    assert active["landlock_abi"] >= 6  # FS writes, TCP and signal scoping
    if shutil.which("bwrap") and os.geteuid() == 0:  # as in CI: setup installs bubblewrap
        assert (active["namespaces"], active["uid"], active["missing"]) == ("bwrap", 65534, [])


def test_namespaces_are_used_when_the_venv_lives_under_the_temp_dir(monkeypatch):
    """A fresh clone in /tmp: bwrap's probe once put its tmpfs on the temp root itself, hid the venv below it,
    failed, and every candidate ran without namespaces."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (scripts/setup.sh installs it where root with apt-get)")
    import sdk.sandbox as sb

    monkeypatch.setattr(tempfile, "tempdir", str(Path(sys.prefix).parent))
    sb._bwrap.cache_clear()
    try:
        assert sb._bwrap() is not None
    finally:
        sb._bwrap.cache_clear()


def test_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout_s=1)
    assert result.status == "timeout"
    assert time.monotonic() - start < 5


def test_sleeping_program_is_killed_at_the_wall_clock_limit():
    result = run_program("import time\ntime.sleep(60)\n", timeout_s=1)
    assert result.status == "timeout" and result.seconds < 5


def test_threads_burning_cpu_faster_than_the_clock_are_a_timeout_not_a_memory_kill():
    source = (
        "import hashlib, threading\n"
        "def spin():\n"
        "    block = bytes(1 << 20)\n"
        "    while True:\n"
        "        hashlib.sha256(block).digest()  # releases the GIL: threads add up CPU time\n"
        "for _ in range(4):\n"
        "    threading.Thread(target=spin, daemon=True).start()\n"
        "threading.Event().wait()\n"
    )
    result = run_program(source, timeout_s=2)
    assert result.status == "timeout", result
    assert _classify(-signal.SIGXCPU, False, "", 2, 256)[0] == "timeout"


def test_unbounded_allocation_hits_the_memory_limit():
    source = "blocks = []\nwhile True:\n    blocks.append(bytearray(10_000_000))\n"
    result = run_program(source, timeout_s=20, memory_mb=256)
    assert result.status == "memory"
    assert result.seconds < 15


@pytest.mark.parametrize(
    "source",
    [
        "import os\nos.fork()\n",
        "import os\nwhile True:\n    os.fork()\n",  # a fork bomb
        "import subprocess\nsubprocess.run(['sleep', '30'])\n",
        "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()\n",
    ],
    ids=["fork", "fork-bomb", "subprocess", "multiprocessing"],
)
def test_process_creation_is_denied(source):
    result = run_program(source, timeout_s=5)
    assert result.status == "failed"
    assert "Operation not permitted" in result.detail
    assert result.seconds < 4


def test_threads_still_work():
    source = "import threading\nout = []\nt = threading.Thread(target=out.append, args=(1,))\nt.start()\nt.join()\n"
    assert run_program(source + "assert out == [1]\n").passed


def test_writes_outside_the_temp_dir_are_denied(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    # Under bubblewrap the host dir is not in the program's file system at all; without it Landlock refuses.
    assert result.status == "failed" and ("Permission denied" in result.detail or "No such file" in result.detail)
    assert not target.exists()
    moved = run_program(f"import os\nos.rename('program.py', {str(tmp_path / 'p.py')!r})\n")
    assert moved.status == "failed" and not (tmp_path / "p.py").exists()


def test_cwd_is_a_private_writable_temp_dir():
    source = (
        "import os, tempfile\n"
        "assert os.path.basename(os.getcwd()).startswith('codepmp-sandbox-')\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'ok')\n"
    )
    assert run_program(source).passed


def test_network_is_unreachable():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(0.5)
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        with pytest.raises(TimeoutError):
            server.accept()
    assert result.status == "failed" and "Operation not permitted" in result.detail


def test_processes_outside_cannot_be_signalled():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        result = run_program(f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)\n")
        assert result.status == "failed"
        time.sleep(0.2)
        assert victim.poll() is None
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("CODEPMP_TEST_SECRET", "hunter2")
    assert run_program("import os\nassert 'CODEPMP_TEST_SECRET' not in os.environ\n").passed


def test_output_flood_is_cut_by_the_file_size_limit():
    result = run_program("import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n", timeout_s=20)
    assert result.status == "failed" and result.seconds < 15


def test_run_many_keeps_input_order_and_reports_each_result():
    sources = ["import time; time.sleep(0.3)\n", "assert False\n", "pass\n"]
    seen: dict[int, ExecResult] = {}
    results = run_many(sources, timeout_s=5, memory_mb=256, workers=2, on_result=seen.__setitem__)
    assert [r.status for r in results] == ["passed", "failed", "passed"]
    assert seen == dict(enumerate(results))


def test_a_program_killed_at_the_time_limit_before_its_boot_reported_is_a_timeout():
    """On a loaded machine the limit can pass while the interpreter is still setting up the layers: the program was
    killed for time (a right one may pass with a longer limit), not broken by the sandbox ("exit status -9")."""
    result = run_program("pass\n", timeout_s=0.001)
    assert result.status == "timeout" and result.detail == "killed after 0.001s wall clock", result


def test_no_sandbox_dir_is_left_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    run_program("open('x', 'w').write('1')\n")
    run_program("while True: pass\n", timeout_s=0.5)
    assert list(tmp_path.iterdir()) == []


def test_reason_is_a_fixed_vocabulary_word():
    from sdk.sandbox import REASONS, reason

    cases = {
        ("passed", ""): "passed",
        ("failed", "AssertionError: x"): "assertion",
        ("failed", "SyntaxError: invalid syntax"): "syntax",
        ("failed", "exited before the end of the program (status 0)"): "early-exit",
        ("failed", "exit status 3"): "exit-status",
        ("failed", "killed by signal SIGTERM"): "signal",
        ("failed", "root:x:0:0:root:/root:/bin/bash"): "exception",  # free text never passes through
        ("timeout", "killed after 2s wall clock"): "timeout",
        ("error", "cannot start the interpreter"): "sandbox-error",
    }
    assert {k: reason(*k) for k in cases} == cases
    assert set(cases.values()) <= set(REASONS)


def test_detail_is_capped():
    result = run_program("raise SystemExit('x' * 5000)\n")
    assert result.status == "failed" and len(result.detail) == 300


def test_a_missing_layer_is_reported_and_warned_about_once(monkeypatch, caplog):
    import sdk.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_bwrap", lambda: None)
    monkeypatch.setattr(sandbox, "_warned", sandbox.threading.Event())
    with caplog.at_level("WARNING", logger="sdk.sandbox"):
        active = layers()
        assert run_program("pass\n").passed
    assert "namespaces (install bubblewrap)" in active["missing"]
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "WITHOUT namespaces" in caplog.records[0].message
