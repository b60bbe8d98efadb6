"""Running a ``tail-service`` command as a real process, for tests that need one."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

#: the console script of the interpreter running the tests
EXE = str(Path(sys.executable).with_name("tail-service"))


@dataclass
class Running:
    """A started command: its process, the URL it announced, and its stderr lines so far."""

    proc: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])


@contextmanager
def run_tail(
    args: list[str], env: dict[str, str], *, ready: str = r"listening on (http://\S+)"
) -> Iterator[Running]:
    """Start ``tail-service ARGS``, wait for a line matching ``ready`` (its group 1, if any, is
    the URL), and stop it (SIGTERM, then SIGKILL after 30 s) on exit. Its stderr keeps being
    collected into ``log``."""
    proc = subprocess.Popen([EXE, *args], stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    running = Running(proc, "")
    for line in proc.stderr:
        running.log.append(line)
        m = re.search(ready, line)
        if m:
            running.url = m.group(1) if m.groups() else "-"
            break
    drain = threading.Thread(target=lambda: running.log.extend(proc.stderr or ()), daemon=True)
    drain.start()
    try:
        assert running.url, f"no line matching {ready!r}:\n" + "".join(running.log[-40:])
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        drain.join(5)
