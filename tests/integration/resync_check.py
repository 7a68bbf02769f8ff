"""Run a route storm, then compare the agent's route map with a fresh
translation of the kernel's state, key by key, until they are equal.

Run inside the agent's namespace:
    resync_check.py BATCH_FILE TIMEOUT

Runs `ip -batch BATCH_FILE` (the storm), then repeatedly reads the route
map from the running agent (control socket `dump`, i.e. the real BPF map)
and translates a fresh netlink dump of the kernel (mirror.netlink.dump +
mirror.translate, no agent involved).  Prints {"ms": time from the storm's
end until both were equal, or null, "diff": the differing keys last seen}.
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
    return {r["prefix"]: (r["action"], r["oif"], r["gateway"], r["mtu"]) for r in rows}


def fresh_routes(ipr):
    state = netlink.dump(ipr)
    names = {i: link.name for i, link in state.links.items()}
    out = {}
    for (dst, plen), e in translate(state).routes.items():
        action = "forward" if e.action == FORWARDED else f"punt:{REASONS[e.action].name}"
        out[f"{dst}/{plen}"] = (action, names.get(e.oif, e.oif) if e.oif else None, e.gateway, e.mtu or None)
    return out


def main(batch, timeout):
    ipr = IPRoute()
    subprocess.run(["ip", "-batch", batch], check=True, stdout=subprocess.DEVNULL)
    t0 = time.monotonic()
    diff = None
    while time.monotonic() - t0 < timeout:
        have, want = agent_routes(), fresh_routes(ipr)
        if have == want:
            print(json.dumps({"ms": (time.monotonic() - t0) * 1000, "routes": len(have)}))
            return
        diff = {k: [have.get(k), want.get(k)] for k in set(have) | set(want) if have.get(k) != want.get(k)}
        time.sleep(0.01)
    print(json.dumps({"ms": None, "diff_count": len(diff), "diff": dict(list(diff.items())[:20])}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
