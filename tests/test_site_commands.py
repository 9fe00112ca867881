"""The README's "Running across sites" commands, as printed, from a clean shell (no venv on PATH): the
SuperLink of step 3 serves, the SuperNode of step 5 registers (step 4) and comes online, and SIGTERM
stops each of them and every process it started within a few seconds. Slow: it starts Flower."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hashing.federated.processes import Tree

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
sys.path.insert(0, str(ROOT / "scripts" / "sites"))
import make_certs  # noqa: E402
import run_loopback as lb  # noqa: E402

sys.path.remove(str(ROOT / "scripts" / "sites"))


def _command(step: str) -> str:
    """The one shell command in the README's step ``step`` ("**3. SuperLink"), joined over its backslashes."""
    (block,) = re.findall(rf"\*\*{re.escape(step)}.*?```\n(.*?)```", README, flags=re.S)
    return block.replace("\\\n", " ").strip()


def _clean_env(home: Path) -> dict:
    return {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "FLWR_HOME": str(home / "flwr"),
            "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1", "FEDHASH_CACHE": str(home / "cache")}


@pytest.mark.slow
def test_readme_site_commands_work_as_printed_and_stop_on_sigterm(tmp_path, digits):
    from tests.test_site_authority import _pngs

    creds = make_certs.make_all(tmp_path / "certs", ["127.0.0.1", "localhost"], ["hospital-a"])
    port = lb.free_port()
    link_cmd = (_command("3. SuperLink")
                .replace("/etc/fedhash/certs/ca.crt", str(creds["ca_cert"]))
                .replace("/etc/fedhash/certs/server.pem", str(creds["server_cert"]))
                .replace("/etc/fedhash/certs/server.key", str(creds["server_key"]))
                .replace("--host 0.0.0.0 --port 9093", f"--host 127.0.0.1 --port {port}")
                .replace("/var/lib/fedhash/superlink.db", str(tmp_path / "superlink.db")))
    assert link_cmd.startswith(".venv/bin/fedhash-superlink ") and str(port) in link_cmd
    data = _pngs(tmp_path / "images", digits)
    node_cmd = (_command("5. SuperNode")
                .replace("fedhash.example.org:9093", f"127.0.0.1:{port}")
                .replace("/etc/fedhash/ca.crt", str(creds["ca_cert"]))
                .replace("/etc/fedhash/hospital-a", str(creds["nodes"]["hospital-a"][0]))
                .replace("/data/images", str(data)).replace("/var/lib/fedhash", str(tmp_path / "site"))
                + f" --port {lb.free_port()}")  # its Runtime API: the default 9094 may be taken on a test machine
    assert node_cmd.startswith(".venv/bin/fedhash-supernode ")
    env = _clean_env(tmp_path)
    lb.write_connection(Path(env["FLWR_HOME"]), "fedhash", f"127.0.0.1:{port}", creds["ca_cert"])
    tree = Tree()
    logs = {}

    def start(name: str, cmd: str) -> subprocess.Popen:
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "wb") as out:
            p = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=ROOT, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        tree.add(p)
        return p

    try:
        link = start("superlink", link_cmd)
        lb.wait_https(port, creds["ca_cert"], link)
        reg = subprocess.run(["bash", "-c", f".venv/bin/flwr supernode register {creds['nodes']['hospital-a'][1]} "
                              "fedhash --name hospital-a --format json"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert '"success": true' in reg.stdout, reg.stdout + reg.stderr
        node = start("supernode", node_cmd)
        deadline = time.monotonic() + 120
        while True:
            r = subprocess.run(["bash", "-c", ".venv/bin/flwr supernode ls fedhash --format json"], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=60)
            if '"online"' in r.stdout:
                break
            assert node.poll() is None, logs["supernode"].read_text()[-3000:]
            assert time.monotonic() < deadline, r.stdout + r.stderr
            time.sleep(1)
        tree.track()
        assert len(tree.living()) >= 4  # the two launchers, Flower's SuperLink (+ its SuperExec), the SuperNode

        for name, p in (("supernode", node), ("superlink", link)):
            t0 = time.monotonic()
            os.kill(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
            took = time.monotonic() - t0
            assert took < 12, f"{name} took {took:.1f} s to stop"
            assert p.returncode == 0, (name, p.returncode, logs[name].read_text()[-2000:])
        time.sleep(0.5)
        assert tree.living() == [], "a process outlived its launcher's stop"
        text = logs["superlink"].read_text() + logs["supernode"].read_text()
        assert "FileNotFoundError" not in text
    finally:
        assert tree.stop(2.0) == []
