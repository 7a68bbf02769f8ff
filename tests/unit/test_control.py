"""The control socket's access rules (mirror/control.py), without root."""

import os
import re
import socket

from mirror import control

MIRROR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "mirror")
NOBODY = control.Peer(pid=0, uid=65534, gid=65534)  # pid 0: no /proc entry, so no capabilities
ROOT = control.Peer(pid=0, uid=0, gid=0)


def test_read_only_requests_answer_everyone():
    for cmd in ("ping", "status", "dump"):
        assert control.authorize({"cmd": cmd}, NOBODY) is None


def test_changes_need_root_or_net_admin():
    reply = control.authorize({"cmd": "stop"}, NOBODY)
    assert reply["denied"] and "permission denied: 'stop' needs root or CAP_NET_ADMIN" in reply["error"]
    assert "uid 65534" in reply["error"]
    assert control.authorize({"cmd": "stop"}, ROOT) is None


def test_unknown_requests_are_not_read_only():
    """A request added later is privileged unless declared read-only."""
    assert control.authorize({"cmd": "reload"}, NOBODY)["denied"]
    assert control.authorize({}, NOBODY)["denied"]


def test_cap_effective():
    status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000001000\n"
    assert control.cap_effective(status) >> control.CAP_NET_ADMIN & 1
    assert control.cap_effective("CapEff:\t0000000000000400\n") >> control.CAP_NET_ADMIN & 1 == 0
    assert control.cap_effective("") == 0


def test_peer_credentials_come_from_the_kernel():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert control.peer_of(a) == control.Peer(os.getpid(), os.getuid(), os.getgid())


def test_no_shell_anywhere_in_the_agent():
    """Names, comments and chain names read from netlink and *-save output
    are untrusted text: the agent runs programs only with argument vectors."""
    shell = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|subprocess\.getoutput|subprocess\.getstatusoutput")
    for name in sorted(os.listdir(MIRROR)):
        if name.endswith(".py"):
            with open(os.path.join(MIRROR, name)) as f:
                assert not shell.search(f.read()), f"mirror/{name} may hand text to a shell"
