"""Per-thread nice values (Linux), for work that must not take the CPU the engine's step thread needs.

On Linux a thread has its own nice value and its own name (``comm``, 15 bytes), and a thread it starts
inherits both: a compile thread given a name of its own marks the worker threads that xgrammar's
C++ starts from it (2 per compile at ``max_threads=2``, gone when it ends), so that another thread can
renice them all together while they run. Elsewhere (``setpriority`` would renice the whole process)
every function here changes nothing; where the system refuses (a thread already gone), neither.
"""

from __future__ import annotations

import os
import sys
import threading

_LINUX = sys.platform.startswith("linux")
_TICKS = os.sysconf("SC_CLK_TCK") if _LINUX else 100


def thread_nice() -> int:
    """The calling thread's nice value (-20 to 19; 0 off Linux)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if _LINUX else 0


def lower_thread_priority(nice: int) -> None:
    """Set the calling thread's nice value to ``nice`` (at most 19) unless it is higher already."""
    if _LINUX:
        _renice(threading.get_native_id(), nice)


def name_thread(name: str) -> None:
    """Name the calling thread ``name`` (its first 15 characters); the threads it starts from now on
    inherit it (:func:`renice_named` finds them by it)."""
    if _LINUX:
        try:
            with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
                comm.write(name[:15])
        except OSError:
            pass


def named_threads(name: str) -> dict[int, float]:
    """The threads of this process named ``name`` (its first 15 characters): thread id -> the CPU time
    it has used, seconds (user and system, in the kernel's clock ticks, 10 ms)."""
    if not _LINUX:
        return {}
    found = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as stat:
                text = stat.read()
        except OSError:  # ended meanwhile
            continue
        comm, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if comm == name[:15]:
            found[int(task)] = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    return found


def renice_named(name: str, nice: int) -> int:
    """Raise the nice value of every thread of this process named ``name`` (its first 15 characters)
    to ``nice`` (at most 19), where lower; returns how many threads carry the name. A thread that such
    a thread starts after this call inherits the new value; one it was starting during the call (the
    microseconds of its ``clone``) may keep the old one: a second call finds it."""
    tids = named_threads(name)
    for tid in tids:
        _renice(tid, nice)
    return len(tids)


def _renice(tid: int, nice: int) -> None:
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < min(19, nice):
            os.setpriority(os.PRIO_PROCESS, tid, min(19, nice))
    except OSError:
        pass
