"""Attach a test program that drops IPv4 (and passes the rest), run inside
a namespace:

    bpfattach.py xdp IFACE          native XDP; stays attached after exit
    bpfattach.py tcx-egress IFACE   tcx egress link; held until this process ends
    bpfattach.py tc-ingress|tc-egress IFACE PRIO drop|mark|drop-prio6
                                    a cls_bpf filter at clsact ingress/egress (there
                                    must be one) at PRIO that drops IPv4, or sets
                                    mark 5, or drops skb->priority 6, else lets the
                                    next filter decide; stays after exit

Prints "ready" once attached.  For tests that check the fast path does not
bypass programs the kernel's own path runs (tc actions such as gact or
skbedit are not built into this kernel; BPF does the same).
"""

import ctypes
import os
import signal
import sys

from bcc import BPF

DROP_IPV4 = r"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/pkt_cls.h>
static __always_inline int is_ipv4(void *data, void *end)
{
    struct ethhdr *eth = data;
    return (void *)(eth + 1) <= end && eth->h_proto == __constant_htons(ETH_P_IP);
}
int xdp_drop_ipv4(struct xdp_md *ctx)
{
    return is_ipv4((void *)(long)ctx->data, (void *)(long)ctx->data_end) ? XDP_DROP : XDP_PASS;
}
int tc_drop_ipv4(struct __sk_buff *skb)
{
    return is_ipv4((void *)(long)skb->data, (void *)(long)skb->data_end) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}
int tc_drop_prio6(struct __sk_buff *skb)
{
    return skb->priority == 6 ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}
int tc_mark(struct __sk_buff *skb)
{
    skb->mark = 5;
    return TC_ACT_UNSPEC;
}
"""
XDP_FLAGS_DRV_MODE = 1 << 2
NR_BPF, BPF_LINK_CREATE, BPF_TCX_EGRESS = 321, 28, 47  # x86-64
_libc = ctypes.CDLL(None, use_errno=True)


class LinkCreate(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_ifindex", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("rest", ctypes.c_uint64 * 6)]


def main(kind, iface, *args):
    b = BPF(text=DROP_IPV4)
    if kind in ("tc-ingress", "tc-egress"):
        from pyroute2 import IPRoute
        prio, what = int(args[0]), args[1]
        fn = b.load_func({"drop": "tc_drop_ipv4", "mark": "tc_mark", "drop-prio6": "tc_drop_prio6"}[what],
                         BPF.SCHED_CLS)
        IPRoute().tc("add-filter", "bpf", socket_ifindex(iface), 1, fd=fn.fd, name=f"test_{what}",
                     parent=0xFFFFFFF2 if kind == "tc-ingress" else 0xFFFFFFF3, prio=prio,
                     direct_action=True, classid=1)
        print("ready", flush=True)
        return
    if kind == "xdp":
        b.attach_xdp(iface, b.load_func("xdp_drop_ipv4", BPF.XDP), XDP_FLAGS_DRV_MODE)
        print("ready", flush=True)
        return
    fn = b.load_func("tc_drop_ipv4", BPF.SCHED_CLS)
    attr = LinkCreate(prog_fd=fn.fd, target_ifindex=socket_ifindex(iface), attach_type=BPF_TCX_EGRESS)
    fd = _libc.syscall(NR_BPF, BPF_LINK_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_LINK_CREATE tcx egress")
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    os.close(fd)


def socket_ifindex(iface):
    import socket
    return socket.if_nametoindex(iface)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(*sys.argv[1:])
