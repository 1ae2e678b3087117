"""The lifeline of one item's command: its processes die with the item, and with the agent.

The runner starts every command as

    python -I -S lifeline.py FD AGENT_PID /bin/sh -c CMD

in a session of its own (`start_new_session`). This program, the supervisor S, leads that session
and its process group (pid = pgid = sid = G), and runs the shell as its child C, in group G. FD is
one end of a socketpair; only the agent holds the other end.

- S is a child subreaper (Linux, PR_SET_CHILD_SUBREAPER): whatever the command starts and leaves
  behind is re-parented to S, not to init, even after setsid() or a double fork. So S can always
  name every process of the command (its descendants, from /proc) and it reaps them all: no
  zombies pile up under an agent that runs as a container's pid 1.
- S reports C's end on FD (`exited <returncode>`) and stays. When the agent's end of FD closes,
  S SIGKILLs every descendant, again until none is left, reports `swept` and exits the way C
  did (same code, or the same signal). The agent closes its end when it lets go of the item (it
  ended, was cancelled, the agent shuts down or hit an exception); and the kernel closes it when the
  agent dies in any way, `kill -9` included, which no signal handler or `finally` could promise.
- S ignores SIGTERM and its like (C gets them back), so the runner's `killpg(G, SIGTERM)` reaches
  the command and not S; the runner never SIGKILLs the group while S answers, so a sweep is never
  cut short. While S lives, pid G cannot be reused, so `killpg(G)` never hits a stranger.
- C gets PR_SET_PDEATHSIG(SIGKILL): should S itself be killed, the shell dies with it.

Why not PR_SET_PDEATHSIG on the shell alone: it reaches one process, and `sh -c 'sleep 100 &'`
leaves `sleep` running. Why not a process-group kill when the agent exits: `kill -9` gives the
agent no chance, and a process can leave the group. A socket's EOF is the one event the kernel
delivers on every death, and the subreaper is what keeps every leftover within reach.

Still escaping: a process that another subreaper below S adopts, or one in another PID namespace;
only a cgroup (a systemd scope, a container) contains those. Without /proc and the subreaper (not
Linux), S can name only process group G, so only processes that stayed in it die.

This file is run as a script with `-I -S` (a fast start that ignores PYTHON* variables, which belong
to the command): standard library only, no weft imports.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

EX_AGENT_GONE = 137  # the agent died before the command started: it is not started
EX_REFUSED = 126  # not started the way the runner starts it, or no fork: the command does not run
SWEEP_ROUNDS = 400  # x SWEEP_PAUSE_S: how long a sweep keeps killing what keeps appearing
SWEEP_PAUSE_S = 0.005
EXITED = b"exited"  # `exited <returncode>\n`: the shell ended (returncode < 0: killed by that signal)
SWEPT = b"swept"  # `swept\n`: no process of the command is left; S exits next
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Signals the runner sends the command's process group, and terminal ones: S ignores them.
_SHIELDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTSTP", "SIGTTIN",
             "SIGTTOU")
_RESTORED = ("SIGPIPE", "SIGXFSZ")  # Python ignores these; a command expects the default (like subprocess)


def _prctl(option: int, arg: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return int(ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _say(fd: int, line: bytes) -> None:
    with contextlib.suppress(OSError):  # the agent is gone: nobody to tell
        os.write(fd, line + b"\n")


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        limit = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024
        return list(range(min(limit if limit > 0 else 1024, 65536)))


def close_fds_except(keep: set[int]) -> None:
    """Close every descriptor but `keep`: some event loops (uvloop) leak theirs into children, and a
    leaked copy of the command's stdout keeps the agent reading long after the command ended."""
    for fd in _open_fds():
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def descendants(root: int) -> list[int]:
    """Every live (not zombie) process below `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        if fields[0] not in (b"Z", b"X"):
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


class Supervisor:
    def __init__(self, fd: int, command: list[str]) -> None:
        self.fd = fd
        self.command = command
        self.child = 0
        self.status: int | None = None  # the shell's returncode once reaped
        self.subreaper = False
        self.original: dict[int, Any] = {}

    def reap(self) -> None:
        """Reap every child that ended (the shell, and orphans the subreaper adopted)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child and self.status is None:
                self.status = os.waitstatus_to_exitcode(status)
                _say(self.fd, EXITED + b" " + str(self.status).encode())

    def sweep(self) -> None:
        """SIGKILL every process of the command until none is left (bounded), reaping as they die."""
        me = os.getpid()
        if not (self.subreaper and os.path.isdir("/proc/self")):
            _say(self.fd, SWEPT)  # all this platform lets us name is our group, and we go with it
            os.killpg(me, signal.SIGKILL)
        for _ in range(SWEEP_ROUNDS):
            self.reap()
            left = descendants(me)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(SWEEP_PAUSE_S)  # our own process: what was SIGKILLed takes a moment to die
        self.reap()
        _say(self.fd, SWEPT)

    def start_shell(self) -> None:
        me = os.getpid()
        pid = os.fork()
        if pid:
            self.child = pid
            return
        try:  # the shell-to-be: the agent's signal dispositions back, and die if S dies
            signal.set_wakeup_fd(-1)
            for sig, handler in self.original.items():
                signal.signal(sig, signal.SIG_IGN if handler == signal.SIG_IGN else signal.SIG_DFL)
            for name in _RESTORED:
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_DFL)
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != me:
                os._exit(EX_AGENT_GONE)
            os.execv(self.command[0], self.command)  # FD and the wake-up pipe are close-on-exec
        except BaseException as err:
            os.write(2, f"weft: cannot run {self.command[0]}: {err}\n".encode())
        os._exit(127)

    def run(self) -> NoReturn:
        self.subreaper = _prctl(PR_SET_CHILD_SUBREAPER, 1)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        noop: Callable[[int, Any], None] = lambda *_: None  # noqa: E731
        self.original[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, noop)
        for name in _SHIELDED:
            if hasattr(signal, name):
                sig = getattr(signal, name)
                self.original[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            self.start_shell()
        except OSError as err:
            os.write(2, f"weft: cannot start the command: {err}\n".encode())
            os._exit(EX_REFUSED)
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)  # hold none of the command's stdio: the agent waits for its EOF
        os.close(null)
        with contextlib.suppress(OSError):
            os.chdir("/")
        while True:
            ready, _, _ = select.select([self.fd, wake_r], [], [])
            if wake_r in ready:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
                self.reap()
            if self.fd in ready:
                try:
                    if not os.read(self.fd, 4096):
                        break  # the agent let go of the item, or died
                except OSError:
                    break
        self.sweep()
        self.exit_like(self.status)

    @staticmethod
    def exit_like(status: int | None) -> NoReturn:
        """Exit as the shell did, so the agent's view of this process matches the command's."""
        if status is None:  # never reaped: it can only have been killed
            os._exit(128 + signal.SIGKILL)
        if status >= 0:
            os._exit(status)
        with contextlib.suppress(Exception):
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the same signal, not a core dump of S
        with contextlib.suppress(OSError, ValueError):
            signal.set_wakeup_fd(-1)
            signal.signal(-status, signal.SIG_DFL)  # SIGKILL cannot be set, nor does it need to be
        with contextlib.suppress(OSError):
            os.kill(os.getpid(), -status)
            time.sleep(1)  # a signal that does not end a process by default: fall through
        os._exit(128 - status)


def main(argv: list[str]) -> NoReturn:
    fd, agent_pid, command = int(argv[1]), int(argv[2]), argv[3:]
    if fd <= 2 or not command or os.getsid(0) != os.getpid():
        # Its sweep kills whatever runs below it; outside a session of its own that is no one's to kill.
        os.write(2, b"weft: the lifeline runs only as the leader of a new session, with a socket\n")
        os._exit(EX_REFUSED)
    os.set_inheritable(fd, False)
    close_fds_except({0, 1, 2, fd})
    if os.getppid() != agent_pid:  # the agent died while starting us
        os._exit(EX_AGENT_GONE)
    Supervisor(fd, command).run()


if __name__ == "__main__":
    main(sys.argv)
