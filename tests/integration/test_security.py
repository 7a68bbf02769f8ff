"""Who may do what through the control socket, and untrusted names.

The control socket is an abstract unix socket: anyone in the namespace can
connect.  Changing requests (stop, ...) need uid 0 or CAP_NET_ADMIN; the
read-only ones (status, dump) answer everyone (docs/reliability.md says why).
"""

import json
import sys

from nstest import skip_unless_root, wait_for

pytestmark = skip_unless_root

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
NOBODY_NET_ADMIN = NOBODY + ["--inh-caps", "+net_admin", "--ambient-caps", "+net_admin"]

RAW_REQUESTS = """
import json, sys
from mirror import control
for req in ({"cmd": "stop"}, {"cmd": "reload"}, {"cmd": "status"}):
    print(json.dumps(control.request(req)))
"""


def test_unprivileged_user_cannot_stop_the_agent(routed_topology, agent):
    topo = routed_topology
    a = agent(topo)
    cp = topo.run("node", NOBODY + [a.exe, "stop", "--timeout", "2"], check=False)
    assert cp.returncode == 1, (cp.stdout, cp.stderr)
    assert "permission denied: 'stop' needs root or CAP_NET_ADMIN (you are uid 65534" in cp.stderr
    assert "Traceback" not in cp.stderr
    # Not through the CLI either: the raw requests, as the same user.
    cp = topo.run("node", NOBODY + [sys.executable, "-c", RAW_REQUESTS])
    stop, reload, status = (json.loads(line) for line in cp.stdout.splitlines())
    assert stop.get("denied") and reload.get("denied"), (stop, reload)
    assert status["running"] and status["ready"]  # read-only: answered
    assert a.running() and a.status()["ready"]


def test_read_only_requests_answer_an_unprivileged_user(routed_topology, agent):
    topo = routed_topology
    a = agent(topo)
    st = json.loads(topo.run("node", NOBODY + [a.exe, "status", "--json"]).stdout)
    assert st["ready"] and sorted(st["interfaces"]) == sorted([topo.node_if1, topo.node_if2])
    routes = json.loads(topo.run("node", NOBODY + [a.exe, "dump", "routes", "--json"]).stdout)
    assert any(r["prefix"] == "10.2.0.0/24" for r in routes)


def test_net_admin_may_stop_the_agent(routed_topology, agent):
    topo = routed_topology
    a = agent(topo)
    cp = topo.run("node", NOBODY_NET_ADMIN + [a.exe, "stop"], check=False, timeout=30)
    assert cp.returncode == 0, cp.stderr
    wait_for(lambda: not a.running(), 10, "agent still running after an authorised stop")


def test_hostile_names_and_comments_stay_text(routed_topology, agent):
    """An interface named with shell metacharacters and a FORWARD rule whose
    comment holds quotes, $() and a newline: mirrored as plain text."""
    topo = routed_topology
    name = "v'\"$(id)`;|&"  # 12 bytes; the kernel refuses only '/', ':' and whitespace
    topo.run("node", ["ip", "link", "add", name, "type", "veth", "peer", "name", "plain0"])
    topo.run("node", ["ip", "link", "set", name, "up"])
    a = agent(topo)
    assert name in a.status()["interfaces"]
    links = json.loads(topo.run("node", [a.exe, "dump", "links", "--json"]).stdout)
    assert name in {row["name"] for row in links}
    comment = 'x"\'$(touch /tmp/loxi-pwned)`id`\n;echo'
    rule = ["FORWARD", "-s", "10.66.0.1", "-m", "comment", "--comment", comment, "-j", "ACCEPT"]
    topo.run("node", ["iptables", "-A"] + rule)
    wait_for(lambda: a.status().get("forwarding_punted_because"), 5, "agent did not see the FORWARD rule")
    topo.run("node", ["iptables", "-D"] + rule)
    wait_for(lambda: not a.status().get("forwarding_punted_because"), 5, "agent did not see the rule go")
    assert a.running()
    assert "Traceback" not in a.log_tail(200)
