"""What a service manager sees: the readiness check and JSON logs of a real agent."""

import json

from nstest import skip_unless_root

pytestmark = skip_unless_root


def test_ready_probe_and_json_logs(routed_topology, agent):
    t = routed_topology
    probe = ["loxi-mirror", "status", "--ready"]
    assert t.run("node", probe, check=False).returncode == 1  # no agent yet
    a = agent(t, "--log-format", "json")
    r = t.run("node", probe, check=False)
    assert r.returncode == 0 and r.stdout == ""
    records = [json.loads(line) for line in open(a.log_path) if line.strip()]
    assert any(r["message"].startswith("ready:") and r["level"] == "info" for r in records)
    a.stop()
    assert t.run("node", probe, check=False).returncode == 1
