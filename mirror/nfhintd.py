"""The iptables-legacy change switch: a small child process of the agent.

    python -m mirror.nfhintd LOCK_PATH CONFIG_FD VALUE_SIZE REASON

iptables-legacy opens its lock file before it changes a table; nothing in the
kernel announces the change itself.  The agent's hint thread reacts to that open,
but it shares the agent's GIL: on a busy machine another agent thread holding it
can delay the thread by milliseconds, long enough for the change to land and the
next packet to pass.  This process has one thread and no one to wait for: it
blocks on inotify of the lock file (SCHED_FIFO when allowed) and, on any event
of that file, sets config.punt_forward_reason (the first u32 of the
config leaf, CONFIG_FD inherited from the agent) to REASON if it is 0, exactly
what Reconciler.hold_forward would write.  The agent's hint thread takes the hold
over and the reconcile after the re-read releases it; the reconciler never clears
a hold while the lock file is open or its events are unread (hint_pending).  It
dies with the agent (PR_SET_PDEATHSIG).
"""

import ctypes
import os
import select
import signal
import struct
import sys

from .bpfsys import map_lookup, map_update
from .netfilter import _LockInotify

PR_SET_PDEATHSIG = 1
KEY = struct.pack("=I", 0)


def switch_on(config_fd: int, value_size: int, reason: int) -> bool:
    """Set the punt reason if none is set; True when it wrote."""
    leaf = map_lookup(config_fd, KEY, value_size)
    if struct.unpack_from("=I", leaf)[0] != 0:
        return False
    struct.pack_into("=I", leaf, 0, reason)
    map_update(config_fd, KEY, bytes(leaf))
    return True


def serve(lock_path: str, config_fd: int, value_size: int, reason: int) -> None:
    watch = _LockInotify(lock_path)
    while True:
        select.select([watch.fd], [], [])
        # The file itself is watched: any event may be the open before a change.
        # Switch first, read after (a switch for a close is lifted by the re-read
        # that close triggers, or by Reconciler.repair_config).
        switch_on(config_fd, value_size, reason)
        watch.drain()


def main(argv) -> int:
    lock_path, config_fd, value_size, reason = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        return 0                      # the agent is already gone
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        pass                          # normal priority: still no GIL to share
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(lock_path, config_fd, value_size, reason)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
