"""A child started through `die_with_parent` dies with the process that started it.

`up` starts its children this way (not with a `preexec_fn`, which can deadlock between
fork and exec in a threaded parent). Tried the hard way: the parent is `kill -9`ed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tail_service.stack import die_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

PARENT = """
import subprocess, sys, threading, time
from tail_service.stack import die_with_parent
# started from a thread that stays alive, as the supervisor does, while others run
def start():
    child = subprocess.Popen(die_with_parent([sys.executable, "-c", "import time; time.sleep(120)"]))
    print(child.pid, flush=True)
    time.sleep(120)
threading.Thread(target=start, daemon=True).start()
for _ in range(4):
    threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_the_child_gets_sigterm_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        # the shim has exec'd the real command in place (same pid)
        command = [sys.executable, "-c", "import time; time.sleep(120)"]
        while Path(f"/proc/{child}/cmdline").read_text().split("\0")[:3] != command:
            assert time.monotonic() < deadline, "the child never exec'd its command"
            time.sleep(0.02)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while _alive(child):
            assert time.monotonic() < deadline, "the child outlived its kill -9'd parent"
            time.sleep(0.02)
    finally:
        parent.kill()
        parent.wait()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_shim_runs_nothing_when_its_parent_is_already_gone() -> None:
    # the pid it was told is not its parent: the parent died before the prctl took effect
    args = die_with_parent([sys.executable, "-c", "print('ran')"])
    pid_at = args.index(str(os.getpid()))
    args[pid_at] = "1"
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0 and done.stdout == ""
    # and with the true parent it runs the command
    done = subprocess.run(
        die_with_parent([sys.executable, "-c", "print('ran')"]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.stdout == "ran\n"
