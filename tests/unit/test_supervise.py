"""How the supervisor stops a child: SIGTERM to the child alone, which stops what it started in
its own order, then SIGKILL to whatever its session still holds."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import psutil

from loraforge.supervise import ChildSpec, Supervisor

# A child that, like `loraforge worker` with its local Ray, starts a helper in its own process
# group and still needs it while it stops (the trainers hand their jobs back through the raylet
# the worker started). On SIGTERM it reports whether its helper was still there, then leaves
# without stopping it.
CHILD = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    from pathlib import Path

    out = Path(sys.argv[1])
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (out / "helper.pid").write_text(str(helper.pid))

    def stop(signum, frame):
        time.sleep(0.3)
        (out / "helper-at-stop").write_text("alive" if helper.poll() is None else "gone")
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    (out / "ready").touch()
    time.sleep(600)
    """
)


def _wait_for(path: Path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def test_stop_lets_the_child_stop_its_own_helpers_then_kills_what_it_left(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    supervisor = Supervisor(
        [ChildSpec("child", [sys.executable, str(script), str(tmp_path)], dict(os.environ))]
    )
    supervisor.start()
    try:
        _wait_for(tmp_path / "ready")
        helper = psutil.Process(int((tmp_path / "helper.pid").read_text()))
        assert os.getpgid(helper.pid) == supervisor.children[0].pid  # the child's own group
    finally:
        supervisor.stop()

    assert (tmp_path / "helper-at-stop").read_text() == "alive"
    assert supervisor.children[0].exited() == 0
    # What the child left behind in its session is killed, not orphaned.
    gone, _ = psutil.wait_procs([helper], timeout=10)
    assert gone, "the helper the child left outlived the stop"
