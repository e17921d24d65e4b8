"""A fork server for tests/test_finetune_faults.py: imports `revengine finetune` (torch, transformers, the
modules named in argv[1:]) once, then runs each command it is sent in a forked child, the process the
test kills with SIGKILL. A child starts in a fraction of a second where `python -m revengine` spends ~5 s
importing, which would be most of what each kill-and-resume costs.

Protocol, one JSON object a line. The test sends {"argv": [...], "log": PATH} to start a command (its
stdout and stderr go to PATH) and {"kill": true} to kill the running one with SIGKILL; the server answers
{"ready": true} once, then per command {"pid": N} when it runs and {"pid": N, "rc": RC} when it has ended
(RC as subprocess reports it: the exit status, or minus the signal). The server kills the child itself,
before it has reaped it, so a kill can never reach another process that reused the pid.

The child runs `revengine finetune`'s own code (revengine.apps.cli.main): the command seeds, sets its
threads and loads everything itself, so nothing of the server is its input but the imported modules.
"""
import importlib
import json
import os
import select
import signal
import sys
import threading
import traceback


class Lines:
    """Lines from a file descriptor without a buffered reader, so select() sees every unread byte."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""

    def get(self, timeout):
        """The next line (bytes, without its newline), b"" at EOF, or None after `timeout` seconds."""
        while b"\n" not in self.buf:
            if not select.select([self.fd], [], [], timeout)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return b""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def child(req) -> int:
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    from revengine.apps import cli
    try:
        return cli.main(req["argv"])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001  (reported in the log, as the interpreter would)
        traceback.print_exc()
        return 1


def send(msg) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def main() -> None:
    for name in ["revengine.apps.cli", "revengine.apps.finetune"] + sys.argv[1:]:
        importlib.import_module(name)
    # forking is safe while this process has one thread and no thread pool (it ran no tensor op)
    assert threading.active_count() == 1, threading.enumerate()
    stdin = Lines(0)
    send({"ready": True})
    while True:
        line = stdin.get(None)
        if not line:
            return
        req = json.loads(line)
        if "argv" not in req:
            continue  # a kill that came after its command ended
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            rc = child(req)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        send({"pid": pid})
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            msg = stdin.get(0.002)
            if msg == b"":  # the test went away: so does its command
                os.kill(pid, signal.SIGKILL)
            elif msg is not None and json.loads(msg).get("kill"):
                os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still this child's
        send({"pid": pid, "rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
