"""A process dying must not stop the platform: `clearhouse up`'s supervisor restarts a
SIGKILLed child, and the embedded broker, which it does not start, is restarted by the
check `up` hands it. (The fault suite proves the same on the whole platform.)"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from clearhouse.embedded import EmbeddedBroker, free_port, port_open
from clearhouse.supervisor import ProcessSpec, Supervisor


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_supervisor_restarts_a_killed_child_and_the_broker(tmp_path):
    spec = ProcessSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"], {}, "http://127.0.0.1:1/",
                       tmp_path / "sleeper.log")
    supervisor = Supervisor([spec])
    broker = EmbeddedBroker(free_port(), tmp_path / "tansu.log")
    broker.start()
    stop = threading.Event()
    watcher = threading.Thread(target=supervisor.watch, args=(stop.is_set,), kwargs={"also": [broker.restart_if_dead]})
    supervisor.start_all()
    watcher.start()
    try:
        child = supervisor.children[0]
        first = child.process.pid
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: child.process is not None and child.process.pid != first and child.process.poll() is None)
        assert child.restarts == 1

        dead_broker = broker.process.pid
        os.kill(dead_broker, signal.SIGKILL)
        wait_until(lambda: broker.process is not None and broker.process.pid != dead_broker
                   and port_open("127.0.0.1", broker.port))
        assert broker.restart_if_dead() is False  # alive: nothing to do
    finally:
        stop.set()
        watcher.join(10)
        supervisor.stop_all()
        broker.stop()
    assert child.process.poll() is not None and not port_open("127.0.0.1", broker.port)
