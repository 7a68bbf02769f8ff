"""Is the agent's network namespace still in use by anyone but the agent?

`ip netns del` only removes the namespace's bind mount: a process inside
keeps the namespace (and its interfaces) alive.  An agent left as the last
user would run on forever as an orphan, so it checks now and then whether
anything else still holds the namespace: a bind mount of it (seen through
/proc/self/mountinfo, which `ip netns exec` keeps in step with the host
as a mount slave) or another process in it.
"""

import os


def current_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def held_by_others(inode: int, proc="/proc") -> bool:
    """True if a bind mount or another process refers to netns `inode`.
    (An open file descriptor alone, as a container runtime may hold, is
    not looked for: that would mean reading every process's fds.)"""
    tag = f"net:[{inode}]"
    with open(os.path.join(proc, "self", "mountinfo")) as f:
        if any(tag in line for line in f):
            return True
    me = str(os.getpid())
    for pid in os.listdir(proc):
        if not pid.isdigit() or pid == me:
            continue
        try:
            if os.stat(os.path.join(proc, pid, "ns", "net")).st_ino == inode and _parent(proc, pid) != me:
                return True
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return False


def _parent(proc: str, pid: str) -> str:
    """The parent pid: the agent's own helpers (the iptables-legacy hint
    process) live in its namespace but do not keep it in use."""
    with open(os.path.join(proc, pid, "stat")) as f:
        return f.read().rsplit(")", 1)[1].split()[1]
