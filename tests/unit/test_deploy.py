"""The service and cluster deployment files: valid for the tools that read them,
and using only CLI options the agent really has."""

import io
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mirror import cli, logfmt

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.30.0"


def test_daemonset_validates_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text()) if d]
    assert {d["kind"] for d in docs} == {"Namespace", "DaemonSet"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any error


def test_schema_validation_catches_a_broken_manifest():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    ds = next(d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())
              if d and d["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["comand"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


@pytest.mark.parametrize("unit", ["loxi-mirror.service", "loxi-mirror@.service"])
def test_systemd_units_verify(unit):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    if not Path("/usr/local/bin/loxi-mirror").exists():
        pytest.skip("/usr/local/bin/loxi-mirror missing (run tools/setup): verify checks ExecStart")
    r = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / unit)], capture_output=True, text=True)
    # verify reports unknown settings on stderr but still exits 0: both must be clean.
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    assert re.search(r"^Restart=on-failure$", (DEPLOY / unit).read_text(), re.M)


def _argvs():
    """Every loxi-mirror command line the deployment files run."""
    ds = next(d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())
              if d and d["kind"] == "DaemonSet")
    c = ds["spec"]["template"]["spec"]["containers"][0]
    out = [c["args"], c["readinessProbe"]["exec"]["command"][1:], c["livenessProbe"]["exec"]["command"][1:],
           c["lifecycle"]["preStop"]["exec"]["command"][1:]]
    docker = (DEPLOY / "Dockerfile").read_text()
    for line in re.findall(r"^(?:CMD|HEALTHCHECK .*CMD) (\[.*\])$", docker, re.M):
        argv = json.loads(line)
        out.append(argv[1:] if argv[0] == "loxi-mirror" else argv)
    for unit in ("loxi-mirror.service", "loxi-mirror@.service"):
        for cmd in re.findall(r"^Exec\w+=/usr/local/bin/loxi-mirror (.*)$", (DEPLOY / unit).read_text(), re.M):
            out.append(cmd.split())
    return out


def test_deployment_command_lines_parse():
    """Each command line the files run is accepted by the real CLI parser
    (checked through --help so nothing is started)."""
    argvs = _argvs()
    assert len(argvs) >= 7
    for argv in argvs:
        ctx = cli.main.make_context("loxi-mirror", list(argv), resilient_parsing=False)
        sub = cli.main.get_command(ctx, argv[0])
        sub.make_context(argv[0], list(argv[1:]), parent=ctx)  # raises on unknown options


def test_dockerfile_copies_what_exists():
    root = DEPLOY.parent
    for srcs in re.findall(r"^COPY (.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M):
        for src in srcs.split():
            assert (root / src).exists(), src


def test_json_log_lines():
    buf = io.StringIO()
    logfmt.configure("json", False, buf)
    try:
        logging.getLogger("loxi-mirror").info("ready: %d interfaces", 2)
        logging.getLogger("loxi-mirror").debug("hidden")
    finally:
        logfmt.configure("text", False, io.StringIO())
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["message"] == "ready: 2 interfaces" and rec["level"] == "info" and rec["time"]


def test_status_ready_fails_without_an_agent():
    # This test process's namespace has no agent (agents run only in test namespaces).
    r = CliRunner().invoke(cli.main, ["status", "--ready"])
    assert r.exit_code == 1 and r.output == ""
