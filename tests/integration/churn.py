"""Interface churn for the fault tests, run inside the agent's namespace:

    churn.py PEER_NS MOVE_NS SECONDS

Creates veth pairs c<i>/p<i> (p<i> in PEER_NS) at the highest rate it can
for SECONDS, gives each an address, the route 10.201.0.0/24 via its peer and
a permanent neighbour entry for that peer (so the fast path can use it), then
deletes it, renames and deletes it, or moves it to MOVE_NS (in turn).
Prints {"cycles": N, "gone": {peer name: CLOCK_REALTIME ns when its node side
stopped existing here}}.
"""

import json
import sys
import time

from pyroute2 import IPRoute, NetNS


def main(peer_ns, move_ns, seconds):
    ipr, peers = IPRoute(), NetNS(peer_ns)
    move_file, peer_file = open(f"/run/netns/{move_ns}"), open(f"/run/netns/{peer_ns}")
    move_fd, peer_fd = move_file.fileno(), peer_file.fileno()
    gone, i, end = {}, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        c, p, net = f"c{i}", f"p{i}", f"10.200.{i % 250}"
        ipr.link("add", ifname=c, kind="veth", peer={"ifname": p, "net_ns_fd": peer_fd})
        idx = ipr.link_lookup(ifname=c)[0]
        pidx = peers.link_lookup(ifname=p)[0]
        peers.link("set", index=pidx, state="up")
        peers.addr("add", index=pidx, address=f"{net}.2", prefixlen=30)
        mac = peers.get_links(pidx)[0].get_attr("IFLA_ADDRESS")
        ipr.link("set", index=idx, state="up")
        ipr.addr("add", index=idx, address=f"{net}.1", prefixlen=30)
        ipr.neigh("replace", dst=f"{net}.2", lladdr=mac, ifindex=idx, state=0x80)  # NUD_PERMANENT
        ipr.route("replace", dst="10.201.0.0", dst_len=24, gateway=f"{net}.2", oif=idx)
        time.sleep(0.01)  # let some probes through this one
        how = i % 3
        if how == 1:
            ipr.link("set", index=idx, ifname=f"r{i}")
        if how == 2:
            ipr.link("set", index=idx, net_ns_fd=move_fd)
        else:
            ipr.link("del", index=idx)
        gone[p] = time.time_ns()
        i += 1
    print(json.dumps({"cycles": i, "gone": gone}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
