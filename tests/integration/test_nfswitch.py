"""mirror/nfswitch.py: the socket filter on the NFTABLES group socket sets the
punt reason inside the nft commit, before the command returns, and leaves a
reason that is already set alone."""

import subprocess
import sys

from nstest import skip_unless_root, unique_name

pytestmark = skip_unless_root

CHECK = r"""
import ctypes, socket, subprocess, sys
from bcc import BPF
from mirror import nfswitch
from mirror.netfilter import _NftMonitor
b = BPF(text="struct cfg { u32 reason, hz; }; BPF_ARRAY(config, struct cfg, 1);")
cfg = b["config"]
mon = _NftMonitor()
nfswitch.attach(mon.sock, cfg.map_fd, 28)
def reason():
    return cfg[ctypes.c_int(0)].reason
out = [reason()]
subprocess.run(["nft", "add", "table", "ip", "lmsw"], check=True)
out.append(reason())                       # set before nft returned, nothing read yet
leaf = cfg.Leaf(14, 250); cfg[ctypes.c_int(0)] = leaf
subprocess.run(["nft", "delete", "table", "ip", "lmsw"], check=True)
out.append(reason())                       # an existing reason is kept
out.append(int(mon.drain()))               # the messages still reach the socket
print(out)
"""


def test_switch_sets_the_reason_inside_the_commit():
    ns = unique_name("lmsw")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cp = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CHECK],
                            capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout.strip().splitlines()[-1] == "[0, 28, 14, 1]"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


HINTD = r"""
import ctypes, os, subprocess, sys, time
from bcc import BPF
lock = sys.argv[1]
b = BPF(text="struct cfg { u32 reason, hz; }; BPF_ARRAY(config, struct cfg, 1);")
cfg = b["config"]
cfg[ctypes.c_int(0)] = cfg.Leaf(0, 250)
p = subprocess.Popen([sys.executable, "-m", "mirror.nfhintd", lock, str(cfg.map_fd), "8", "28"],
                     pass_fds=(cfg.map_fd,))
time.sleep(1.0)                                  # let it start watching
out = [cfg[ctypes.c_int(0)].reason]
fd = os.open(lock, os.O_RDONLY)                  # what iptables-legacy does before a change
deadline = time.monotonic() + 5
while cfg[ctypes.c_int(0)].reason == 0 and time.monotonic() < deadline:
    time.sleep(0.001)
out.append(cfg[ctypes.c_int(0)].reason)
out.append(cfg[ctypes.c_int(0)].hz)              # the rest of the leaf is kept
os.close(fd)
p.terminate(); p.wait(5)
print(out)
"""


def test_legacy_switch_process_sets_the_reason_on_open(tmp_path):
    lock = tmp_path / "xtables.lock"
    lock.write_text("")
    cp = subprocess.run([sys.executable, "-c", HINTD, str(lock)], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip().splitlines()[-1] == "[0, 28, 250]"
