"""The gradient-leakage lab (simulations/leakage/): attacks on the updates the silo's own client code
makes, on a tiny slice (scikit-learn's digits, 2 IID silos, 16 bits, 32 px).

Each attack is checked to move the right way (better without DP than with it, worse at larger batches),
its metrics against independent references (brute-force Hamming ranks, a brute-force assignment, the
ReRo formula by hand), and the whole study through ``fedhash leakage``."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

from hashing.codes import hamming, logits_to_codes
from hashing.config import Config
from hashing.index import SiloIndex
from simulations.leakage import bounds, metrics
from simulations.leakage import victim as V
from simulations.leakage.attacks import analytic, matching, statistics, trap

from .conftest import toml_text

BASE = dict(data="digits", n_images=0, num_silos=2, partitioner="iid", bits=16, size=32, views=2, supervised=False,
            num_server_rounds=10, local_epochs=1, seed=0)


@pytest.fixture(scope="module", autouse=True)
def _env(cache_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDHASH_CACHE", str(cache_dir))
        yield


@pytest.fixture(scope="module")
def lab():
    return V.lab(Config(**BASE))


@pytest.fixture(scope="module")
def sup_lab():
    return V.lab(Config(**(BASE | {"supervised": True})))


@pytest.fixture(scope="module")
def lora_lab():
    return V.lab(Config(**(BASE | {"mode": "lora", "n_images": 400})))


@pytest.fixture(scope="module")
def dp_lab():
    return V.lab(Config(**BASE, dp="sample", dp_epsilon=1.0))


def _aux(lb):
    s = lb.silos[1]
    return np.asarray(s.clean[s.silo.splits.train], np.float64)


def _views(truth):
    return np.concatenate([np.concatenate(v) for v in truth.views])


def _one_class_rounds(lb, n: int, seed: int = 3):
    """n rounds of silo 0, each on 2 images of one class: (class, observation, truth)."""
    rng = np.random.default_rng(seed)
    s = lb.silos[0]
    for _ in range(n):
        c = int(rng.integers(10))
        pos = np.sort(rng.choice(np.nonzero(s.train_labels == c)[0], 2, replace=False))
        yield (c, *V.observe(lb, 0, pos, cfg=lb.cfg.replace(batch_size=2), with_stats=False))


def _cos(lb, attack: str, batch: int, trials: int = 4, seed: int = 0, steps: int = 1) -> float:
    rng = np.random.default_rng(seed)
    cfg = lb.cfg.replace(batch_size=batch, local_epochs=steps)
    sent = trap.craft(lb.model, _aux(lb)) if attack == "trap" else None
    out = []
    for _ in range(trials):
        pos = np.sort(rng.choice(lb.silos[0].n_train, batch, replace=False))
        obs, truth = V.observe(lb, 0, pos, cfg=cfg, model=sent, with_stats=False)
        rec = analytic.recover(obs)
        x = _views(truth)
        if rec.space == "projected":
            with torch.inference_mode():
                x = lb.model.net[0](torch.from_numpy(x)).numpy()
        out.append(metrics.hungarian(rec.features, x, signed=rec.signed).mean)
    return float(np.mean(out))


# --------------------------------------------------------------------------- the victim is the real client


def test_observe_runs_the_silos_own_training_and_keeps_the_truth_apart(lab):
    obs, truth = V.observe(lab, 0, [3, 5], cfg=lab.cfg.replace(batch_size=2))
    assert set(obs.sent) == set(obs.received) and obs.metrics["num_examples"] == 2 and obs.metrics["steps"] == 1
    moved = {k: float(obs.delta(k).abs().max()) for k in obs.sent}
    assert all(v > 0 for v in moved.values())  # every trainable array moved: a real AdamW step
    # the global model itself is untouched (the silo trained a copy)
    p, _ = lab.model.state()
    assert all(torch.equal(p[k], obs.sent[k]) for k in p)
    assert len(truth.views) == 1 and truth.views[0][0].shape == (2, lab.feature_dim)
    # the recorded views are rows of the silo's own cached views of those images
    cached = np.asarray(lab.silos[0].train_views[[3, 5]], np.float32)
    for i in range(2):
        assert any(np.array_equal(truth.views[0][0][i], cached[i, v]) for v in range(cached.shape[1]))
    assert obs.stats is not None and float(obs.stats["count"][0]) == 2


def test_observe_is_what_local_train_gives_the_clientapp():
    """The lab's update equals the one the ClientApp's own site.local_train makes on the same silo and
    message (same seeds): nothing of training is re-implemented."""
    from client import site

    cfg = Config(**BASE).replace(batch_size=4)
    lb = V.lab(cfg)
    data = V.restrict(lb.silos[0], np.arange(8))
    import copy

    h = copy.deepcopy(lb.model)
    site.local_train(cfg, data, h, 1, prototypes=None)
    obs, _ = V.observe(lb, 0, np.arange(8), cfg=cfg, with_stats=False)
    mine, _ = h.state()
    assert all(torch.equal(mine[k], obs.received[k]) for k in mine)


# --------------------------------------------------------------------------- attacks move the right way


def test_trap_recovers_the_views_exactly_at_the_smallest_batch(lab):
    assert _cos(lab, "trap", 2) > 0.99


def test_honest_server_recovers_less_than_the_crafted_model(lab):
    honest, crafted = _cos(lab, "analytic", 2), _cos(lab, "trap", 2)
    assert honest < crafted - 0.05, (honest, crafted)


def test_recovery_degrades_with_batch_size(lab):
    assert _cos(lab, "trap", 64, trials=2) < _cos(lab, "trap", 2) - 0.05


def test_sample_level_dp_takes_recovery_away(lab, dp_lab):
    nodp, dp = _cos(lab, "analytic", 2), _cos(dp_lab, "analytic", 2)
    assert dp < nodp - 0.2, (nodp, dp)


def test_matching_refines_without_losing_the_analytic_start(lab):
    rng = np.random.default_rng(1)
    pos = np.sort(rng.choice(lab.silos[0].n_train, 2, replace=False))
    obs, truth = V.observe(lab, 0, pos, cfg=lab.cfg.replace(batch_size=2), with_stats=False)
    rec = analytic.recover(obs)
    start = np.clip(rec.features, 0, None)
    out = matching.recover(obs, lab.model, _aux(lab), start=start, iterations=15)
    x = _views(truth)
    assert out.features.shape == x.shape and np.all(out.features >= 0)
    assert metrics.hungarian(out.features, x).mean >= metrics.hungarian(start, x).mean - 0.05


def test_supervised_matching_recovers_the_classes_from_the_update(sup_lab):
    """Supervised update matching also searches the labels; on batches of 2 images of one class, from the
    analytic features and no label guess, it names the class (chance: 0.1)."""
    lb = sup_lab
    hits = []
    for c, obs, truth in _one_class_rounds(lb, 4):
        start = np.clip(analytic.recover(obs).features, 0, None)
        rec = matching.recover(obs, lb.model, _aux(lb), start=start, iterations=2, seed=1)  # one label sweep
        assert rec.labels.shape == (2,) and rec.features.shape == _views(truth).shape
        hits.append(float(np.mean(rec.labels == c)))
    assert np.mean(hits) >= 0.75, hits


def test_matching_simulates_the_dp_heads_clipped_per_image_step():
    """On the DP head the server simulates DP-SGD's step before the noise (each image's gradient clipped,
    summed): nearly noise-free (ε = 1000), the true views match the silo's step better than the server's
    own features do; the candidates are features (non-negative, one per view)."""
    lb = V.lab(Config(**BASE, dp="sample", dp_epsilon=1000.0))
    obs, truth = V.observe(lb, 0, [3, 9], cfg=lb.cfg.replace(batch_size=2), with_stats=False)
    x = _views(truth)
    at_truth = matching.recover(obs, lb.model, _aux(lb), iterations=0, start=x).mismatch
    rec = matching.recover(obs, lb.model, _aux(lb), iterations=5, seed=1)
    at_aux = matching.recover(obs, lb.model, _aux(lb), iterations=0, seed=1).mismatch
    assert rec.features.shape == x.shape and np.all(rec.features >= 0) and rec.space == "features"
    assert at_truth < at_aux - 0.03 and rec.mismatch <= at_aux, (at_truth, at_aux, rec.mismatch)


def test_breaching_reference_runs_on_the_same_update(lab):
    """breaching's Inverting Gradients (the PyPI package) on the silo's observed step, from the same start as
    fedhash's matching: it keeps more of the trap's linear (gradient-like) step than of the honest sign step."""
    from simulations.leakage.attacks import reference

    rng = np.random.default_rng(3)
    out = {}
    for name, sent in (("honest", None), ("trap", trap.craft(lab.model, _aux(lab)))):
        pos = np.sort(rng.choice(lab.silos[0].n_train, 2, replace=False))
        obs, truth = V.observe(lab, 0, pos, cfg=lab.cfg.replace(batch_size=2), model=sent, with_stats=False)
        start = np.clip(analytic.recover(obs).features, 0, None)[:4]
        rec = reference.recover(obs, sent or lab.model, iterations=60, start=start)
        assert rec.features.shape == _views(truth).shape and np.isfinite(rec.features).all()
        out[name] = metrics.hungarian(rec.features, _views(truth)).mean
    assert out["trap"] > out["honest"] + 0.2 and out["trap"] > 0.5, out


def test_adapters_attack_matches_the_lora_step_through_the_backbone(lora_lab):
    """LoRA mode: the adapters' step holds the views, the objective is lowest there; the server's
    optimisation from its own images lowers it (double backward through the backbone)."""
    from hashing.views import load_batch, resize
    from simulations.leakage.attacks import adapters

    lb = lora_lab
    obs, truth = V.observe(lb, 0, [3, 17], cfg=lb.cfg.replace(batch_size=2), with_stats=False)
    assert all(k in obs.sent for k in adapters.adapter_names(obs)) and any("lora_B" in k for k in obs.sent)
    pre = lb.model.preprocess
    views = np.concatenate(truth.views[0])
    pix = views[:, 0] * pre["std"][0] + pre["mean"][0]
    s1 = lb.silos[1]
    aux = resize(load_batch(s1.silo.ds, s1.silo.splits.train[:32], 32), 32)[:, 0].numpy()
    at_truth = adapters.recover(obs, lb.model, aux, iterations=0, start=pix).match
    out = adapters.recover(obs, lb.model, aux, iterations=8, seed=1)
    assert out.images.shape == pix.shape and out.images.min() >= 0 and out.images.max() <= 1
    assert at_truth < out.start_match - 0.1, (at_truth, out.start_match)
    assert out.match <= out.start_match


def test_statistics_of_one_image_give_its_own_code(lab):
    from client import site

    s = lab.silos[0]
    one = V.restrict(s, [7])
    stats = site.local_stats(lab.cfg, one, lab.model)
    q = logits_to_codes(statistics.mean_code(lab.model, stats))
    own = logits_to_codes(lab.model.encode(s.inputs, one.silo.splits.train))
    assert np.array_equal(q, own)


def test_label_inference_reads_the_class_from_a_supervised_update(sup_lab):
    from simulations.leakage.attacks import labels

    lb = sup_lab
    hits = []
    for c, obs, _ in _one_class_rounds(lb, 10):  # a batch of one class: its prototype's code is the whole target
        hits.append(int(labels.infer(obs, lb.model)[0] == c))
    assert np.mean(hits) >= 0.8  # chance: 0.1


def test_statistics_of_a_supervised_silo_give_its_label_histogram(sup_lab):
    from client import site

    lb = sup_lab
    cfg = lb.cfg
    s = V.restrict(lb.silos[0], np.arange(12))
    hist = statistics.label_histogram(site.local_stats(cfg, s, lb.model))
    assert np.array_equal(hist, np.bincount(s.train_labels, minlength=len(hist)).astype(float))


# --------------------------------------------------------------------------- metrics against references


def test_reidentify_agrees_with_brute_force_hamming():
    rng = np.random.default_rng(0)
    bits = 32
    db = rng.integers(0, 2, size=(200, bits)).astype(bool)
    db = np.unique(db, axis=0)
    ids = np.arange(len(db)) * 3 + 11
    idx = SiloIndex(bits, "m")
    from hashing.codes import pack

    idx.add(pack(db), ids, model_version="m")
    q = db[[5, 40]] ^ (rng.random((2, bits)) < 0.1)  # noisy copies of two database codes
    res = metrics.reidentify(idx, pack(q), ids[[5, 40]], k=10, model_version="m")
    d = hamming(pack(q), pack(db))
    for i, v in enumerate([5, 40]):
        # brute force: from query j the victim's rank lies in [codes strictly closer, + codes tied) (ties come
        # in FAISS's order); its best rank over both queries lies between the smallest of those bounds
        closer = [int((d[j] < d[j, v]).sum()) for j in range(2)]
        upto = [closer[j] + int((d[j] == d[j, v]).sum()) for j in range(2)]
        r = res.rank[i]
        if r >= 0:
            assert min(closer) <= r < min(upto)
        else:
            assert min(closer) >= 10 or min(upto) > 10
        assert r >= 0 or min(closer) > 0
    assert res.queries == 2 and res.chance(10) == pytest.approx(20 / len(db))
    # the server does not say which query is whose: a victim counts when any query finds it
    swapped = metrics.reidentify(idx, pack(q[::-1]), ids[[5, 40]], k=10, model_version="m")
    assert np.array_equal(swapped.rank, res.rank)


def test_hungarian_matches_brute_force_assignment():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    m = metrics.hungarian(a, b)
    c = metrics.cosine_matrix(a, b)
    best = max(sum(c[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
    assert m.cosine.sum() == pytest.approx(best)


def test_clopper_pearson_against_scipy_binomtest():
    from scipy.stats import binomtest

    assert metrics.clopper_pearson_low(0, 10) == 0.0
    ci = binomtest(3, 20).proportion_ci(confidence_level=0.95, method="exact")
    assert metrics.clopper_pearson_low(3, 20) == pytest.approx(ci.low)


def test_rero_bound_by_hand():
    assert bounds.rero(math.inf, 1e-5, 0.01) == 1.0
    e, d = bounds.replace_one(1.0, 1e-5)
    assert e == 2.0 and d == pytest.approx((1 + math.e) * 1e-5)
    assert bounds.rero(1.0, 1e-5, 0.01) == pytest.approx(0.01 * math.exp(2) + (1 + math.e) * 1e-5)
    assert bounds.rero(8.0, 1e-5, 0.01) == 1.0
    # over the privacy profile: never above the bound at the run's δ, never below the blind guess
    from hashing.privacy import accountant

    plan = accountant.silo_plan(Config(**BASE, dp="sample", dp_epsilon=1.0, batch_size=8), 8)
    at = bounds.rero(plan.epsilon, plan.delta, 0.02)
    prof = bounds.rero_profile(plan.history(), 0.02)
    assert 0.02 <= prof <= at
    assert accountant.epsilon(plan.history(), plan.delta) == pytest.approx(plan.epsilon, rel=1e-6)


# --------------------------------------------------------------------------- the study through the CLI


def _scenario(tmp_path, **extra) -> str:
    values = {"name": "leak-test", "data": "digits", "n-images": 0, "partitioner": "iid", "num-silos": 2, "seed": 0,
              "bits": 16, "size": 32, "views": 2, "supervised": False, "num-server-rounds": 10,
              "leakage-smallest-trials": 4} | extra
    p = tmp_path / "leak.toml"
    p.write_text(toml_text(values))
    return str(p)


@pytest.fixture(scope="module")
def model_file(lab, tmp_path_factory):
    """A global model to attack (the lab's round-1 model) as a model.pt, so the CLI test needs no Ray."""
    from hashing import model

    s = lab.silos[0]
    path = tmp_path_factory.mktemp("leak-model") / "model.pt"
    ident = model.identity(lab.model, backbone=lab.cfg.backbone, weights_id=s.weights_id, size=lab.cfg.size)
    model.save_model(path, lab.model, ident)
    return path


def test_fedhash_leakage_end_to_end(tmp_path, capsys, model_file):
    from simulations.cli import main

    rc = main(["leakage", "--scenario", _scenario(tmp_path), "--attack", "analytic,trap,invert,statistics",
               "--batch-sizes", "2,16", "--local-steps", "1", "--epsilons", "inf,1,client", "--trials", "3",
               "--model", str(model_file), "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| attack |" in out
    (run,) = list((tmp_path / "runs").iterdir())
    for f in ("leakage.json", "table.md", "reid_vs_batch.png", "reid_vs_epsilon.png", "reconstructions.png"):
        assert (run / f).stat().st_size > 0, f
    rows = json.loads((run / "leakage.json").read_text())["rows"]
    by = {(r["attack"], r["epsilon"], r["batch"]): r for r in rows}
    # exact in most trials; where a row never separates an image's two views their mean comes back instead
    assert by[("trap", math.inf, 2)]["cosine"] > 0.95 and by[("trap", math.inf, 2)]["trials"] == 4
    assert by[("trap", math.inf, 2)]["exact"] >= 0.5 and by[("trap", math.inf, 2)]["cosine"] > by[("analytic", math.inf, 2)]["cosine"]
    assert by[("trap", math.inf, 16)]["cosine"] < by[("trap", math.inf, 2)]["cosine"]
    inv = by[("invert", math.inf, 2)]
    assert 0 <= inv["ssim"] <= 1 and inv["psnr"] > 0 and 0 <= inv["ssim_prior"] <= 1 and inv["psnr_prior"] > 0
    dp = by[("analytic", 1.0, 2)]
    assert dp["epsilon_planned"] <= 1.0 + 1e-6 and dp["cosine"] < by[("analytic", math.inf, 2)]["cosine"]
    for r in rows:  # no measured DP point is above the bound its privacy profile puts on any attacker (95%)
        if "bound_top10" in r and r["trials"]:
            assert r["top10_low95"] <= r["bound_top10"] and r["top1_low95"] <= r["bound_top1"], r
            assert r["bound_top10"] <= r["bound_top10_at_delta"] and "ABOVE" not in r["note"]
    assert "trap" in {r["attack"] for r in rows if r["epsilon"] == 1.0 and r["note"]}  # said why, not skipped
    # client-level DP: the silo only clips; the server sees its update whole (the noise is the server's own)
    client = by[("analytic", "client", 2)]
    assert client["trials"] == 3 and "nothing in it is hidden" in client["note"] and "bound_top10" not in client
    assert client["cosine"] > dp["cosine"] + 0.2
    # beside the trap: what re-identification reaches with the true views and with the clean features
    t = by[("trap", math.inf, 2)]
    assert 0 <= t["top10_true_views"] <= 1 and 0 <= t["top10_true_clean"] <= 1


@pytest.mark.parametrize("args, says", [
    (["--attack", "gradients"], "--attack: 'gradients' is not an attack of the lab"),
    (["--batch-sizes", "1"], "--batch-sizes: a batch of 1 image cannot train the probe head"),
    (["--batch-sizes", "two"], "whole numbers"),
    (["--epsilons", "0"], "--epsilons: ε = 0 must be > 0"),
    (["--epsilons", "8,clients"], "--epsilons: 'clients' is not a number"),
    (["--model", "/nonexistent/model.pt"], "no such file"),
])
def test_bad_leakage_input_is_one_line(tmp_path, capsys, args, says):
    from simulations.cli import main

    rc = main(["leakage", "--scenario", _scenario(tmp_path), *args, "--runs-dir", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_fedhash_leakage_in_lora_mode(tmp_path, capsys, lora_lab):
    """The study on a LoRA model: the head's first layer reads the adapted backbone's features (scored against
    the sent backbone's features of the true views); the trap, crafted in the LoRA model's head, returns them
    exactly; the adapters attack gives images."""
    from hashing import model
    from simulations.cli import main

    path = tmp_path / "model.pt"
    s = lora_lab.silos[0]
    model.save_model(path, lora_lab.model, model.identity(lora_lab.model, backbone=lora_lab.cfg.backbone,
                                                           weights_id=s.weights_id, size=lora_lab.cfg.size))
    scn = _scenario(tmp_path, mode="lora", **{"n-images": 400, "leakage-smallest-trials": 1})
    rc = main(["leakage", "--scenario", scn, "--attack", "analytic,adapters,trap", "--batch-sizes", "2",
               "--local-steps", "1", "--epsilons", "inf", "--trials", "1", "--model", str(path),
               "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0, capsys.readouterr().err
    (run,) = list((tmp_path / "runs").iterdir())
    by = {r["attack"]: r for r in json.loads((run / "leakage.json").read_text())["rows"]}
    assert 0.3 < by["analytic"]["cosine"] <= 1 and by["analytic"]["trials"] == 1 and by["analytic"]["n_db"] > 0
    ad = by["adapters"]
    assert ad["trials"] == 1 and -1 <= ad["cosine"] <= 1 and ad["psnr"] > 0 and 0 <= ad["ssim_prior"] <= 1
    assert ad["mismatch_true_views"] < ad["mismatch_start"] and ad["mismatch"] <= ad["mismatch_start"]
    assert by["trap"]["cosine"] > 0.95 and by["trap"]["cosine"] > by["analytic"]["cosine"]
    assert 0 <= by["trap"]["top10_true_views"] <= 1 and 0 <= by["trap"]["top10_true_clean"] <= 1
    assert (run / "reconstructions.png").stat().st_size > 0


def test_dp_in_lora_mode_is_refused_before_work(tmp_path, capsys):
    from simulations.cli import main

    rc = main(["leakage", "--scenario", _scenario(tmp_path, mode="lora"), "--epsilons", "inf,8",
               "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "DP trains in probe mode" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_model_of_another_length_is_refused_before_work(tmp_path, capsys, model_file):
    from simulations.cli import main

    rc = main(["leakage", "--scenario", _scenario(tmp_path, bits=32), "--model", str(model_file),
               "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "probe head of 16 bits" in err and "32 bits" in err, err
    assert not (tmp_path / "runs").exists()


def test_a_bad_scenario_key_is_blamed_on_the_file(tmp_path, capsys):
    from simulations.cli import main

    path = _scenario(tmp_path, **{"leakage-batch-sizes": [2, 0]})
    rc = main(["leakage", "--scenario", path, "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{path}: leakage-batch-sizes" in err and ">= 1" in err, err


def test_supervised_scenario_with_dp_is_refused_before_work(tmp_path, capsys):
    from simulations.cli import main

    rc = main(["leakage", "--scenario", _scenario(tmp_path, supervised=True), "--epsilons", "inf,8",
               "--runs-dir", str(tmp_path / "runs")])
    assert rc == 2 and "unsupervised" in capsys.readouterr().err


@pytest.mark.slow
def test_fedhash_leakage_trains_the_federation_it_attacks(tmp_path, capsys):
    """Without --model the study first trains the scenario's federation on Flower's simulation engine and
    attacks its final model."""
    from hashing.model import load_model
    from simulations.cli import main

    rc = main(["leakage", "--scenario", _scenario(tmp_path, **{"num-server-rounds": 2}), "--attack", "analytic,trap",
               "--batch-sizes", "2", "--local-steps", "1", "--epsilons", "inf", "--trials", "2",
               "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0
    (run,) = list((tmp_path / "runs").iterdir())
    model, rec = load_model(run / "federation" / "model.pt")
    assert model.kind == "probe" and rec["model_version"]
    rows = json.loads((run / "leakage.json").read_text())["rows"]
    assert {r["attack"] for r in rows} == {"analytic", "trap"} and all(r["trials"] == 4 for r in rows)  # smallest
