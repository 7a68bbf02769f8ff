"""Run a route storm, then compare the agent's route map with a fresh
translation of the kernel's state, key by key, until they are equal.

Run inside the agent's namespace:
    resync_check.py BATCH_FILE TIMEOUT [--all]

--all compares the links (which interfaces) and neighbours maps as well.

Runs `ip -batch BATCH_FILE` (the storm), translates a fresh netlink dump of
the kernel (mirror.netlink.dump + mirror.translate, no agent involved) and
repeatedly reads the route map from the running agent (control socket
`dump`, i.e. the real BPF map) until the two are equal (and a second fresh
translation confirms the kernel did not change meanwhile).  Prints {"ms":
time from the storm's end until they were equal, or null, "diff": the
differing keys last seen}.
"""

import json
import subprocess
import sys
import time

from pyroute2 import IPRoute

from mirror import control, netlink
from mirror.reasons import FORWARDED, REASONS
from mirror.translate import translate


def agent_routes():
    rows = control.request({"cmd": "dump", "table": "routes"})["entries"]
    out = {r["prefix"]: (r["action"], r["oif"], r["gateway"], r["mtu"]) for r in rows}
    if ALL:
        out.update(agent_links_and_neighbors())
    return out


def agent_links_and_neighbors():
    links = control.request({"cmd": "dump", "table": "links"})["entries"]
    neighbors = control.request({"cmd": "dump", "table": "neighbors"})["entries"]
    out = {f"link {r['name']}": True for r in links}
    out.update({f"neighbor {r['interface']} {r['ip']}": r["mac"] for r in neighbors})
    return out


def fresh_routes(ipr):
    state = netlink.dump(ipr)
    names = {i: link.name for i, link in state.links.items()}
    desired = translate(state)
    out = {}
    for (dst, plen), e in desired.routes.items():
        action = "forward" if e.action == FORWARDED else f"punt:{REASONS[e.action].name}"
        out[f"{dst}/{plen}"] = (action, names.get(e.oif, e.oif) if e.oif else None, e.gateway, e.mtu or None)
    if ALL:
        out.update({f"link {names[i]}": True for i in desired.links})
        out.update({f"neighbor {names[i]} {ip}": mac for (i, ip), mac in desired.neighbors.items()})
    return out


ALL = "--all" in sys.argv


def main(batch, timeout):
    ipr = IPRoute()
    subprocess.run(["ip", "-batch", batch], check=True, stdout=subprocess.DEVNULL)
    t0 = time.monotonic()
    # The kernel's state is final now: translate it once, poll the agent's
    # map against it, and check it is still what the kernel says at the end.
    want, diff = fresh_routes(ipr), None
    while time.monotonic() - t0 < timeout:
        have = agent_routes()
        if have == want:
            ms = (time.monotonic() - t0) * 1000
            if fresh_routes(ipr) == want:
                print(json.dumps({"ms": ms, "routes": len(have)}))
                return
            want = fresh_routes(ipr)
        diff = {k: [have.get(k), want.get(k)] for k in set(have) | set(want) if have.get(k) != want.get(k)}
        time.sleep(0.005)
    print(json.dumps({"ms": None, "diff_count": len(diff), "diff": dict(list(diff.items())[:20])}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
