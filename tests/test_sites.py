"""fedhash with the Flower CLI: `flwr run .` on a local simulation, and real sites on loopback
(TLS, SuperNode authentication, an unregistered SuperNode refused). scripts/sites/ does the work;
these tests drive it and check what it leaves: files, and no process still running."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hashing import retrieval

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "scripts" / "sites"


def _load(name: str):
    """A script of scripts/sites/ as a module (they are scripts, not a package)."""
    if f"sites_{name}" in sys.modules:
        return sys.modules[f"sites_{name}"]
    spec = importlib.util.spec_from_file_location(f"sites_{name}", SITES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    sys.path.insert(0, str(SITES))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(SITES))
    return mod


make_certs = _load("make_certs")


def _dead(pids) -> bool:
    def alive(pid: int) -> bool:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return raw[raw.rindex(")") + 2] not in "ZX"

    return not [p for p in map(int, pids) if alive(p)]


# ---------------------------------------------------------------- fast: credentials


def test_make_certs_writes_what_flower_reads(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

    paths = make_certs.make_all(tmp_path, ["127.0.0.1", "localhost"], ["site-a", "intruder"])

    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = load_pem_private_key(paths["server_key"].read_bytes(), None)
    assert key.public_key() == server.public_key()
    assert paths["server_key"].stat().st_mode & 0o077 == 0

    for name in ("site-a", "intruder"):
        priv_path, pub_path = paths["nodes"][name]
        # flower-supernode --auth-supernode-private-key: an OpenSSH EC private key, no passphrase
        priv = load_ssh_private_key(priv_path.read_bytes(), None)
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
        assert priv_path.stat().st_mode & 0o077 == 0
        # flwr supernode register: an OpenSSH public key on a NIST curve
        pub = bytes_to_public_key(try_load_public_key(pub_path))
        assert public_key_to_bytes(pub) == public_key_to_bytes(priv.public_key())
    assert paths["nodes"]["site-a"][1].read_bytes() != paths["nodes"]["intruder"][1].read_bytes()


def test_make_certs_command_line(tmp_path):
    r = subprocess.run([sys.executable, str(SITES / "make_certs.py"), str(tmp_path), "--node", "hospital-a"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"ca.crt", "ca.key", "server.pem", "server.key", "keys"}
    assert {p.name for p in (tmp_path / "keys").iterdir()} == {"hospital-a", "hospital-a.pub"}
    if Path("/usr/bin/openssl").exists():
        v = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.pem")],
                           capture_output=True, text=True, timeout=30)
        assert v.returncode == 0, v.stdout + v.stderr


# ---------------------------------------------------------------- slow: Flower CLI end to end


def _image_folder(root: Path, digits, classes=(0, 1), per_class: int = 30, offset: int = 0) -> Path:
    """class_name/*.png from scikit-learn's digits, 8x8 grayscale scaled to 0..255."""
    from PIL import Image

    for c in classes:
        (root / f"digit-{c}").mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(digits.labels == c)[offset:offset + per_class]
        for i in idx:
            img = np.asarray(digits.images[i], dtype=np.float32)
            img = (255 * img / max(img.max(), 1)).astype(np.uint8)
            Image.fromarray(img.squeeze()).save(root / f"digit-{c}" / f"{i}.png")
    return root


@pytest.fixture
def flower_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.slow
def test_flwr_run_local_simulation(tmp_path, flower_env):
    lb = _load("run_loopback")
    s = lb.run_local_simulation(
        tmp_path / "sim", 'num-server-rounds=1 n-images=600 bits=16 size=32 views=2 batch-size=64 partitioner="iid" client-threads=1',
        app=REPO, num_supernodes=2, timeout=480)
    assert s["ok"], s
    assert s["run_status"] == "finished:completed"
    server = Path(s["server_out_dir"])
    assert sorted(p.name for p in (server / "checkpoints").glob("round-*.pt")) == ["round-0001.pt"]
    # `flwr run` left a background SuperLink; it was found (by its log file under our FLWR_HOME) and stopped
    assert s["superlink_pids"] and set(map(str, s["superlink_pids"])) <= set(s["pids"])
    assert s["alive_after_stop"] == []
    assert _dead(s["pids"])
    assert lb.local_superlink_pids(tmp_path / "sim" / "flwr-home") == []


@pytest.mark.slow
def test_two_sites_on_loopback_with_tls_and_supernode_auth(tmp_path, flower_env, digits, capsys):
    lb = _load("run_loopback")
    sites = {"site-a": str(_image_folder(tmp_path / "data-a", digits, offset=0)),
             "site-b": str(_image_folder(tmp_path / "data-b", digits, offset=30))}
    queries = [sorted(Path(sites["site-a"]).rglob("*.png"))[0], sorted(Path(sites["site-b"]).rglob("*.png"))[1]]
    s = lb.run_loopback(tmp_path / "fed", sites,
                        "num-server-rounds=2 bits=16 size=32 views=2 batch-size=32 local-epochs=1 client-threads=1",
                        app=REPO, timeout=480, search=[str(q) for q in queries], search_k=15)
    assert s["run_status"] == "finished:completed", s
    assert s["ok"], s
    view = s["status_view"]  # fedhash status --federation, through the SuperLink's Control API
    assert view["status"] == "done" and view["round"] == 2 and view["num_server_rounds"] == 2, view
    assert sorted(v["silo"] for v in view["sites"].values()) == ["site-a", "site-b"]
    assert all(v["ok"] and v["phase"] == "index" for v in view["sites"].values()) and view["n_failures"] == 0

    for name in sites:  # each site's index under its own out-dir (node config out-dir)
        out = Path(s["sites"][name]["out_dir"])
        assert out == tmp_path / "fed" / "sites" / name
        assert list(out.rglob("catalogue.sqlite")), f"no index under {out}"
    server = Path(s["server_out_dir"])
    # provenance tells the two sites apart (same count of images, at the same positions)
    fed = json.loads((server / "federation.json").read_text())
    assert sorted(fed["silos"]) == sorted(sites) and len(set(fed["silos"].values())) == 2
    # a site searches its index by image, from the CLI: one of its own images comes first at distance 0
    from simulations.cli import main

    folder = next(Path(s["sites"]["site-a"]["out_dir"]).rglob("catalogue.sqlite")).parent
    query = sorted(Path(sites["site-a"]).rglob("*.png"))[3]
    assert main(["search", "--index", str(folder), "--image", str(query), "-k", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["queries"][0]["results"]
    assert res[0]["distance"] == 0 and str(query.resolve()) in [h["path"] for h in res if h["distance"] == 0]
    with retrieval.open_index(folder) as idx:
        assert idx.model_version == fed["model_version"] and len(idx) > 0
        _, codes = idx.cat.codes(idx.model_version)
        found = {h.path for row in idx.search_codes(codes, 1000, model_version=idx.model_version) for h in row}
        assert found <= {str(p.resolve()) for p in Path(sites["site-a"]).rglob("*.png")}  # its own images only
    assert sorted(p.name for p in (server / "checkpoints").glob("round-*.pt")) == ["round-0001.pt", "round-0002.pt"]

    # one cross-silo query batch after training, by code only, through the SuperLink: both registered sites
    # answered (the intruder was never asked), and the merged top-k is brute force over both sites' indexes
    from hashing.federated.search import brute_force
    from simulations import federated_search

    ans = s["search"]
    assert ans["asked"] == 2 and ans["answered"] == ["site-a", "site-b"] and ans["failed"] == [], ans
    assert ans["model_version"] == fed["model_version"]
    union = {}
    for name in sites:
        with retrieval.open_index(next(Path(s["sites"][name]["out_dir"]).rglob("catalogue.sqlite")).parent) as idx:
            union[name] = idx.cat.codes(idx.model_version)
    codes = federated_search.encode_queries(federated_search.query_encoder(ans["index"]), queries)
    want = brute_force(union, codes, 15)
    for q in range(2):
        assert [(h["silo"], h["id"], h["distance"]) for h in ans["queries"][q]] == \
            [(h["silo"], h["id"], h["distance"]) for h in want.hits(q)]
        assert all("labels" not in h and "path" not in h for h in ans["queries"][q])  # ids and distances only
    assert ans["queries"][0][0]["distance"] == 0 and ans["queries"][1][0]["distance"] == 0  # each found itself
    assert "search" not in (tmp_path / "fed" / "logs" / "supernode-intruder.log").read_text().lower()

    # the unregistered SuperNode was refused: Flower exit code 305, "Failed to activate SuperNode"
    intruder = s["intruder"]
    assert intruder["refused"], intruder
    assert intruder["flower_exit_code"] == 305 and intruder["exit_status"] == 1
    assert "Failed to activate SuperNode" in intruder["supernode_log_line"]
    assert "No SuperNode found with the given public key" in intruder["superlink_log_line"]
    assert intruder["nodes_known_to_superlink"] == 2
    assert not list((tmp_path / "fed" / "sites" / "intruder").rglob("catalogue.sqlite"))

    assert s["alive_after_stop"] == []
    assert len(s["pids"]) >= 4  # superlink, two supernodes, the intruder (and their SuperExecs, apps)
    assert _dead(s["pids"])


@pytest.mark.slow
def test_secure_aggregation_between_real_sites(tmp_path, flower_env, digits):
    """secagg = true across two SuperNodes (TLS, authentication, fedhash-supernode's warm process): each
    site's keys live in its node state between messages, and the server aggregates only masked vectors."""
    lb = _load("run_loopback")
    s = lb.run_loopback(tmp_path / "fed", _two_sites(tmp_path, digits),
                        "num-server-rounds=2 bits=16 size=32 views=2 batch-size=32 local-epochs=1 client-threads=1 "
                        "secagg=true", app=REPO, timeout=480, intruder=False)
    assert s["run_status"] == "finished:completed", s
    fed = json.loads((Path(s["server_out_dir"]) / "federation.json").read_text())
    assert [r["secagg_silos"] for r in fed["rounds"]] == [2, 2] and [r["stats_secagg_silos"] for r in fed["rounds"]] == [2, 2]
    assert fed["rounds"][0]["secagg_setups"] == 1 and fed["failures"] == []
    for name in ("site-a", "site-b"):
        assert list(Path(s["sites"][name]["out_dir"]).rglob("catalogue.sqlite"))
    assert s["alive_after_stop"] == [] and _dead(s["pids"])


# ---------------------------------------------------------------- slow: sites that come and go

COME_AND_GO = ("num-server-rounds=4 bits=16 size=32 views=2 batch-size=32 local-epochs=1 min-train-nodes=1 "
               "round-timeout=30")
# a message whose objects never arrive (the SuperLink killed mid-transfer) fails its task after 15 s
PULL = ["--task-pull-timeout", "15"]


def _two_sites(tmp_path, digits) -> dict[str, str]:
    return {"site-a": str(_image_folder(tmp_path / "data-a", digits, offset=0)),
            "site-b": str(_image_folder(tmp_path / "data-b", digits, offset=30))}


@pytest.mark.slow
def test_a_site_killed_mid_run_is_recorded_and_rejoins_with_the_current_model(tmp_path, flower_env, digits):
    lb = _load("run_loopback")

    def chaos(ctx):
        done = len(ctx.view().get("rounds") or [])
        if done >= 1 and "killed" not in ctx.state:
            ctx.down.add("site-b")
            ctx.kill("supernode-site-b")  # kill -9 the site's launcher: its SuperNode dies with it
            ctx.state["killed"] = done
        elif "killed" in ctx.state and "back" not in ctx.state and done >= ctx.state["killed"] + 1:
            ctx.start_site("site-b")  # the same command, the same key: the same node
            ctx.down.discard("site-b")
            ctx.state["back"] = done

    rounds = 10  # a restarted SuperNode takes a few seconds to come online; rounds here take about 3 s
    s = lb.run_loopback(tmp_path / "fed", _two_sites(tmp_path, digits),
                        COME_AND_GO.replace("num-server-rounds=4", f"num-server-rounds={rounds}"), app=REPO,
                        timeout=900, intruder=False, chaos=chaos, supernode_args=PULL)
    assert s["ok"] and s["run_status"] == "finished:completed", s
    fed = json.loads((Path(s["server_out_dir"]) / "federation.json").read_text())
    trained = [r["trained"] for r in fed["rounds"]]
    assert [r["round"] for r in fed["rounds"]] == list(range(1, rounds + 1))
    assert trained[0] == ["site-a", "site-b"]
    gone = [i for i, t in enumerate(trained) if t == ["site-a"]]
    assert gone, trained  # a round finished with the site that stayed
    assert trained[-1] == ["site-a", "site-b"], trained  # ... and the killed site trained again later
    assert any(f.get("silo") == "site-b" or str(f["node"]) == s["sites"]["site-b"]["node_id"] for f in fed["failures"])
    for name in ("site-a", "site-b"):  # both sites hold the final model's index
        folder = next(Path(s["sites"][name]["out_dir"]).rglob("catalogue.sqlite")).parent
        with retrieval.open_index(folder) as idx:
            assert idx.model_version == fed["model_version"]
    assert s["alive_after_stop"] == [] and _dead(s["pids"])


@pytest.mark.slow
def test_a_superlink_killed_mid_run_restarts_and_the_run_resumes(tmp_path, flower_env, digits):
    lb = _load("run_loopback")

    def chaos(ctx):
        done = len(ctx.view().get("rounds") or [])
        if done >= 2 and "killed" not in ctx.state:
            ctx.state["killed"] = done
            ctx.kill("superlink")  # kill -9 the SuperLink's launcher: the SuperLink and its ServerApp die with it
            ctx.start_superlink()  # the same port and database: registrations and SuperNodes carry on
            return "resume"
        return None

    s = lb.run_loopback(tmp_path / "fed", _two_sites(tmp_path, digits), COME_AND_GO.replace("min-train-nodes=1",
                        "min-train-nodes=2"), app=REPO, timeout=900, intruder=False, chaos=chaos, supernode_args=PULL)
    assert s["ok"] and s["run_status"] == "finished:completed", s
    assert len(s["run_ids"]) == 2  # the killed run, and the one that resumed it
    server = Path(s["server_out_dir"])
    fed = json.loads((server / "federation.json").read_text())
    assert [r["round"] for r in fed["rounds"]] == [1, 2, 3, 4] and fed["status"] == "done"
    assert sorted(p.name for p in (server / "checkpoints").glob("round-*.pt")) == [
        f"round-{r:04d}.pt" for r in (2, 3, 4)]  # keep-checkpoints = 3: round 1's is pruned
    assert all(r["trained"] == ["site-a", "site-b"] for r in fed["rounds"])
    assert s["alive_after_stop"] == [] and _dead(s["pids"])
