"""The gradient-leakage study: ``fedhash leakage --scenario leakage-demo``.

For each privacy setting (``epsilons``: ``inf`` is no DP, a number is sample-level DP at that target ε per
silo, planned by the silo's own accountant), each attack, each batch size and each number of local steps,
``trials`` times: draw ``batch`` victim images from silo 0's training split, let the silo train its round
on them with its own client code (:func:`simulations.leakage.victim.observe`), attack what the server
receives, and score it: cosine between recovered and true inputs (Hungarian matching), and the
re-identification rate: the server encodes each reconstruction with the global model and searches the
silo's FAISS index (all its database images); a victim counts when it is in the top 1 / top 10 of any of
the server's queries, against the chance of as many random queries. Beside each DP row, the bound that
the silo's (ε, δ) puts on any attacker (:mod:`simulations.leakage.bounds`).

Attacks (``attacks``): ``analytic`` (the honest server, :mod:`.attacks.analytic`), ``trap`` (a server that
crafts the model it sends, :mod:`.attacks.trap`; the probe head or LoRA's head), ``matching`` (:mod:`.attacks.matching`,
started from the analytic candidates; supervised, with the labels), ``breaching`` (the external reference:
the ``breaching`` package's Inverting Gradients from the same start, :mod:`.attacks.reference`), ``invert``
(the trap's features to pixels, :mod:`.attacks.invert`), ``adapters`` (LoRA mode: images straight from the
adapters' step, :mod:`.attacks.adapters`), ``statistics`` (the statistics reply of a silo of ``batch``
images, :mod:`.attacks.statistics`; heads pooled every round only), ``labels`` (supervised,
:mod:`.attacks.labels`).

Writes ``leakage.json``, ``table.md`` and the plots to the run folder.
"""
from __future__ import annotations

import copy
import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.site import SiloData
from hashing import atomic, plots
from hashing.backbones import backbone_for, data_config
from hashing.codes import logits_to_codes
from hashing.config import Config
from hashing.errors import ConfigError
from hashing.privacy import accountant
from hashing.hashers import Hasher, reads_features
from hashing.index import SiloIndex
from hashing.model import load_model
from hashing.views import load_batch, normalise, resize

from ..runs import new_run_dir
from ..scenario import Scenario
from ..sweep import parse_epsilons as parse_epsilons_of_sweep
from . import bounds, metrics
from . import victim as V
from .attacks import adapters, analytic, invert, labels, matching, reference, statistics, trap

ATTACKS = ("analytic", "trap", "matching", "breaching", "invert", "adapters", "statistics", "labels")
CLIENT = "client"  # client-level DP in the epsilons list: the server clips and noises the silo's whole update
VERSION = "leakage-lab"  # the lab's index holds codes of the lab's global model only


@dataclass
class Plan:
    attacks: tuple[str, ...] = ATTACKS
    batch_sizes: tuple[int, ...] = (2, 8, 32)
    local_steps: tuple[int, ...] = (1, 4)
    epsilons: tuple[float | str, ...] = (math.inf, 8.0, 4.0, 1.0, CLIENT)
    trials: int = 20
    smallest_trials: int = 100  # at the smallest batch and one step, without DP: the 100 trials
    matching_trials: int = 3    # update matching costs seconds a trial (double backward through the head)
    matching_iterations: int = 60
    invert_trials: int = 3      # image inversion through the backbone: seconds per image
    invert_iterations: int = 100
    breaching_iterations: int = 200  # breaching's own default is 24,000 (for images on a GPU)
    adapters_trials: int = 2    # images from the adapters: double backward through the backbone, ~0.5 s a step
    adapters_iterations: int = 60
    costly_max_batch: int = 8   # matching and inversion stop at this batch
    silo: int = 0
    seed: int = 0


def _items(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [x.strip() for x in str(v).split(",") if x.strip()]


def _ints(name: str, v: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in _items(v))
    except (TypeError, ValueError):
        raise ConfigError(f"{name} {v!r}: give whole numbers, e.g. 2,8,32") from None
    if not out or min(out) < 1:
        raise ConfigError(f"{name} {v!r}: give one or more whole numbers >= 1, e.g. 2,8,32")
    return out


def parse_epsilons(name: str, v: Any) -> tuple[float | str, ...]:
    """Target ε values of sample-level DP (``inf``: no DP; :func:`simulations.sweep.parse_epsilons`) and
    ``client`` (client-level DP), in the order given."""
    items = [str(x).strip().lower() for x in _items(v)]
    out: list[float | str] = []
    for x in items:
        out.extend([CLIENT] if x == CLIENT else parse_epsilons_of_sweep(x, name=name))
    if not out:
        raise ConfigError(f"{name} is empty; write e.g. inf,8,4,1,client")
    return tuple(out)


def parse_attacks(name: str, v: Any) -> tuple[str, ...]:
    items = _items(v)
    bad = [a for a in items if a not in ATTACKS]
    if bad or not items:
        raise ConfigError(f"{name}: {bad[0] if bad else v!r} is not an attack of the lab; use some of: "
                          f"{', '.join(ATTACKS)}")
    return tuple(dict.fromkeys(items))


def plan_from(scn: Scenario, *, attacks=None, batch_sizes=None, local_steps=None, epsilons=None,
              trials=None) -> Plan:
    """The study's plan: the command line's values, else the scenario's ``leakage-*`` keys, else the defaults.
    At the smallest batch and one local step without DP the study runs ``leakage-smallest-trials`` trials
    (default: 100, or ``--trials`` when given on the command line)."""
    raw = scn.raw
    p = Plan(seed=scn.cfg.seed)
    src = scn.source or "the scenario"

    def pick(name: str, cli, parse, flag: str | None = None):
        """The command line's value (errors name its option), else the scenario's (errors name the file's key)."""
        if cli is not None:
            return parse(f"--{flag or name}", cli)
        if f"leakage-{name}" in raw:
            return parse(f"{src}: leakage-{name}", raw[f"leakage-{name}"])
        return None

    p.attacks = pick("attacks", attacks, parse_attacks, flag="attack") or p.attacks
    p.batch_sizes = pick("batch-sizes", batch_sizes, _ints) or p.batch_sizes
    p.local_steps = pick("local-steps", local_steps, _ints) or p.local_steps
    p.epsilons = pick("epsilons", epsilons, parse_epsilons) or p.epsilons
    given = pick("trials", trials, _ints)
    p.trials = given[0] if given else p.trials
    smallest = pick("smallest-trials", None, _ints)
    p.smallest_trials = smallest[0] if smallest else (p.trials if trials is not None else max(p.trials, 100))
    if scn.cfg.supervised and any(e == CLIENT or not math.isinf(e) for e in p.epsilons):
        raise ConfigError(f"{src}: sample-level DP trains unsupervised CroVCA; set supervised = false, or sweep "
                          "epsilons = inf only")
    if scn.cfg.mode != "probe" and any(e == CLIENT or not math.isinf(e) for e in p.epsilons):
        raise ConfigError(f"{src}: DP trains in probe mode, not mode = {scn.cfg.mode!r}; sweep epsilons = inf only, "
                          "or set mode = \"probe\"")
    if min(p.batch_sizes) < 2:
        who = "--batch-sizes" if batch_sizes is not None else f"{src}: leakage-batch-sizes"
        raise ConfigError(f"{who}: a batch of 1 image cannot train the {scn.cfg.mode} head (its Batch Renormalization "
                          "needs 2 rows a view); the smallest batch is 2")
    return p


def config_at(cfg: Config, epsilon: float | str, batch: int, steps: int) -> Config:
    """The run's config for one cell: DP off at inf, sample-level DP at a number, client-level DP with
    client-side clipping (the scenario's noise, else 1) at "client"; the victim's round is ``steps`` local
    epochs over its ``batch`` images (one step each)."""
    base = cfg.replace(batch_size=batch, local_epochs=steps)
    if epsilon == CLIENT:
        return base.replace(dp="client", dp_clipping="client-fixed", dp_noise=cfg.dp_noise or 1.0)
    return base.replace(dp="none") if math.isinf(epsilon) else base.replace(dp="sample", dp_epsilon=float(epsilon))


@dataclass
class Cell:
    attack: str
    epsilon: float | str
    batch: int
    steps: int
    trials: int = 0
    cosine: list[float] = field(default_factory=list)
    exact: list[float] = field(default_factory=list)  # trials whose every input came back at cosine >= 0.99
    top1: list[float] = field(default_factory=list)
    top10: list[float] = field(default_factory=list)
    chance1: list[float] = field(default_factory=list)
    chance10: list[float] = field(default_factory=list)
    epsilon_planned: float = math.inf
    delta: float = 0.0
    n_db: int = 0
    label_exact: list[float] = field(default_factory=list)
    label_accuracy: list[float] = field(default_factory=list)  # victims whose class is among the top-B guessed
    label_chance: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    psnr_prior: list[float] = field(default_factory=list)  # the server's prior image (mean of its aux images)
    ssim_prior: list[float] = field(default_factory=list)
    cosine_pixels: list[float] = field(default_factory=list)  # backbone features of the images vs the recovered
    match: list[float] = field(default_factory=list)        # adapters: 1 - cos of the simulated step, at the end
    match_start: list[float] = field(default_factory=list)  # ... at the start (the server's images)
    match_truth: list[float] = field(default_factory=list)  # ... at the true views (scoring only)
    ceiling: dict[str, list[float]] = field(default_factory=dict)  # top-10 of the true views / clean features
    seconds: float = 0.0
    note: str = ""
    history: list | None = None  # the silo's DP plan as (noise, sample rate, steps): its privacy profile

    @property
    def victims(self) -> int:
        return self.trials * self.batch

    def row(self) -> dict[str, Any]:
        m = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
        kappa1, kappa10 = m(self.chance1), m(self.chance10)
        r = {"attack": self.attack, "epsilon": self.epsilon, "batch": self.batch, "steps": self.steps,
             "trials": self.trials, "cosine": m(self.cosine), "exact": m(self.exact), "top1": m(self.top1), "top10": m(self.top10),
             "chance_top1": kappa1, "chance_top10": kappa10, "epsilon_planned": self.epsilon_planned,
             "delta": self.delta, "n_db": self.n_db, "seconds": round(self.seconds, 2), "note": self.note}
        if self.label_exact:
            r["label_histogram_exact"] = m(self.label_exact)
        if self.label_accuracy:
            r["label_accuracy"], r["label_chance"] = m(self.label_accuracy), m(self.label_chance)
        for key, v in self.ceiling.items():
            r[f"top10_true_{key}"] = m(v)
        if self.psnr:
            r |= {"psnr": m(self.psnr), "ssim": m(self.ssim), "psnr_prior": m(self.psnr_prior),
                  "ssim_prior": m(self.ssim_prior)}
        if self.cosine_pixels:
            r["cosine_of_images"] = m(self.cosine_pixels)
        if self.match:
            r |= {"mismatch": m(self.match), "mismatch_start": m(self.match_start),
                  "mismatch_true_views": m(self.match_truth)}
        if not math.isinf(self.epsilon_planned):  # the run's (ε, δ), and the best point of its privacy profile
            r["bound_top1_at_delta"] = bounds.rero(self.epsilon_planned, self.delta, kappa1)
            r["bound_top10_at_delta"] = bounds.rero(self.epsilon_planned, self.delta, kappa10)
            prof = (lambda k: bounds.rero_profile(self.history, k)) if self.history else (lambda k: 1.0)  # noqa: E731
            r["bound_top1"] = min(r["bound_top1_at_delta"], prof(kappa1))
            r["bound_top10"] = min(r["bound_top10_at_delta"], prof(kappa10))
            for top in ("top1", "top10"):  # the measured rate's 95% lower end, over every victim of the cell
                hits = getattr(self, top)
                n = self.victims
                r[f"{top}_low95"] = metrics.clopper_pearson_low(int(round(float(np.mean(hits)) * n)) if hits else 0, n)
                if r[f"{top}_low95"] > r[f"bound_{top}"]:
                    r["note"] = (r["note"] + "; " if r["note"] else "") + f"{top} ABOVE THE DP BOUND: a bug to find"
        return r


def train_global(cfg: Config, out: Path) -> Path:
    """The federation the study attacks, trained first: ``cfg`` (without DP) on Flower's simulation engine, the
    same run as ``fedhash simulate`` (no references); returns its ``model.pt``."""
    from ..runner import run_federations

    fcfg = cfg.replace(dp="none", out_dir=str(out))
    run_federations([fcfg], {"name": "leakage: the attacked federation"}, labels=["federation (no DP)"],
                    log_path=out.parent / "log.txt")
    return out / "model.pt"


@dataclass
class Setting:
    """One privacy setting's federation as the study holds it: the lab, the attacked silo's index, and the
    server's own auxiliary data (another silo's images: data like the victim's, never the victim's own)."""

    lab: V.Lab
    index: SiloIndex
    aux_silo: SiloData | None
    aux: np.ndarray | None            # the auxiliary silo's clean features (n, d) (LoRA: of the sent backbone)
    aux_norm: float | None            # their median norm
    nonneg: bool                      # whether the backbone's features are >= 0 (ReLU6)
    crafted: Hasher | None = None     # the trap's model, made once


class Study:
    def __init__(self, scn: Scenario, plan: Plan, model: Hasher | None = None):
        self.scn, self.plan, self.model = scn, plan, model
        self.settings: dict[str, Setting] = {}
        self._backbone: torch.nn.Module | None = None
        self._prior: np.ndarray | None = None
        self.grid: dict[str, np.ndarray] = {}  # the first inversion's victims and reconstructions, for the figure

    def setting(self, cfg: Config) -> Setting:
        key = cfg.hasher_kind + f"/{cfg.dp}/{cfg.dp_epsilon if cfg.dp == 'sample' else ''}"
        if key not in self.settings:
            # without DP the trained global model; under DP round 1's (the DP head after its moments release)
            lb = V.lab(cfg, self.model if cfg.dp == "none" else None)
            s = lb.silos[self.plan.silo]
            db = s.silo.splits.database
            idx = SiloIndex(cfg.bits, VERSION)
            idx.add(logits_to_codes(lb.model.encode(s.inputs, db)), db, model_version=VERSION)
            other = next((o for i, o in enumerate(lb.silos) if i != self.plan.silo), None)
            aux = None
            if other is not None:  # cached features, or (LoRA) the features the sent backbone gives its images
                tr = other.silo.splits.train
                aux = np.asarray(other.clean[tr] if reads_features(cfg.hasher_kind)
                                 else lb.model.backbone_features(other.inputs, tr), np.float64)
            self.settings[key] = Setting(lb, idx, other, aux,
                                         None if aux is None else float(np.median(np.linalg.norm(aux, axis=1))),
                                         bool(aux is not None and aux.min() >= 0))
        return self.settings[key]

    def crafted(self, st: Setting) -> Hasher:
        """The trap's model for this setting's global model, crafted on the server's auxiliary data."""
        if st.aux is None:
            raise ConfigError("the trap attack needs a second silo as the server's auxiliary data; set num-silos >= 2")
        if st.crafted is None:
            st.crafted = trap.craft(st.lab.model, st.aux, seed=self.plan.seed)
        return st.crafted

    # ------------------------------------------------------------------ encoding reconstructions

    @staticmethod
    def _queries(rec: analytic.Recovery) -> np.ndarray:
        """What the server searches with, from its candidates alone: in feature space one reconstruction per
        image, the mean of each pair of candidates that are each other's most similar (an image's two views);
        the DP head's candidates (its projected basis, known up to sign) with both signs."""
        f = np.asarray(rec.features, np.float64)
        if rec.space == "projected":
            return np.concatenate([f, -f])
        return analytic.pair_views(f) if len(f) >= 2 else f

    @staticmethod
    def _logits(lb: V.Lab, rec: analytic.Recovery, queries: np.ndarray) -> np.ndarray:
        """The logits of the queries under the global model (the silo's asymmetric search takes logits); the
        DP head's projected queries give code = sign(rotation @ u)."""
        model = lb.model
        x = torch.from_numpy(np.asarray(queries, np.float32))
        if rec.space == "projected":
            with torch.inference_mode():
                return model.net[2](model.net[1](x)).numpy()
        return _encode_features(model, x.numpy())

    @staticmethod
    def _view_inputs(sent: Hasher, truth: V.Truth, first_step: bool = False) -> np.ndarray:
        """The inputs of the head the update was computed on: the views' cached features, or (LoRA) the sent
        backbone's features of the view images (scoring only); every step's, or the first step's."""
        views = truth.views[:1] if first_step else truth.views
        x = np.concatenate([np.concatenate(v) for v in views])
        if x.ndim == 2:
            return x
        bb = sent.backbone
        was = bb.training
        bb.eval()
        with torch.inference_mode():
            f = bb(torch.from_numpy(x)).double().numpy()
        bb.train(was)
        return f

    def _clean(self, lb: V.Lab, images: np.ndarray) -> np.ndarray:
        """The head's inputs for the clean view of silo images (scoring only): cached, or (LoRA) the global
        model's adapted backbone's."""
        s = lb.silos[self.plan.silo]
        if s.clean is not None:
            return np.asarray(s.clean[images], np.float64)
        return np.asarray(lb.model.backbone_features(s.inputs, np.asarray(images)), np.float64)

    def aux_images(self, st: Setting, cfg: Config) -> np.ndarray:
        """The server's own images (another silo's), at the silos' input size: (n, S, S) grey or (n, S, S, 3)."""
        if st.aux_silo is None:
            raise ConfigError("the attack needs a second silo as the server's auxiliary data; set num-silos >= 2")
        other = st.aux_silo
        x = resize(load_batch(other.silo.ds, other.silo.splits.train[:256], cfg.size), cfg.size)
        return x[:, 0].numpy() if x.shape[1] == 1 else x.permute(0, 2, 3, 1).numpy()

    def _adapters(self, st: Setting, cfg: Config, obs: V.Observation, truth: V.Truth, c: "Cell",
                  rng: np.random.Generator) -> np.ndarray:
        """Images straight from the adapters' step (:mod:`.attacks.adapters`), scored against the views the
        first step trained on (backbone features: cosine, Hungarian; pixels: PSNR and SSIM); returns the
        server's queries (the global model's logits of the images' features, each pair of views averaged)."""
        lb = st.lab
        aux = self.aux_images(st, cfg)
        out = adapters.recover(obs, lb.model, aux, iterations=self.plan.adapters_iterations,
                               seed=int(rng.integers(1 << 31)))
        pre = lb.model.preprocess
        grey = out.images.ndim == 3
        x = torch.from_numpy(out.images[:, None] if grey else out.images.transpose(0, 3, 1, 2).copy())
        bb = lb.model.backbone.eval()
        with torch.inference_mode():
            f = bb(normalise(x, pre["mean"], pre["std"])).double().numpy()
        true_f = self._view_inputs(lb.model, truth, first_step=True)
        mt = metrics.hungarian(f, true_f)  # scoring only
        c.cosine.append(mt.mean)
        c.exact.append(float(len(mt.cosine) >= 2 * c.batch and mt.cosine.min() >= 0.99))
        v = np.concatenate(truth.views[0])  # the true views, normalised as the silo fed them
        pix = v * np.asarray(pre["std"]).reshape(1, 3, 1, 1) + np.asarray(pre["mean"]).reshape(1, 3, 1, 1)
        pix = pix[:, 0] if grey else pix.transpose(0, 2, 3, 1)
        prior = aux.mean(0)
        for r, k in zip(mt.rows, mt.cols):
            p, q = invert.psnr_ssim(out.images[r], pix[k])
            c.psnr.append(p)
            c.ssim.append(q)
            p, q = invert.psnr_ssim(prior, pix[k])
            c.psnr_prior.append(p)
            c.ssim_prior.append(q)
        c.match.append(out.match)
        c.match_start.append(out.start_match)
        c.match_truth.append(adapters.recover(obs, lb.model, aux, iterations=0, start=pix).match)
        if not self.grid:
            self.grid = {"victims": pix[mt.cols], "reconstructions": out.images[mt.rows],
                         "title": "victims' views (top) and the server's images from the adapters' step (bottom)"}
        rid = metrics.reidentify(st.index, _encode_features(lb.model, analytic.pair_views(true_f)), truth.images,
                                 k=10, model_version=VERSION)
        c.ceiling.setdefault("views", []).append(rid.rate(10))
        return _encode_features(lb.model, analytic.pair_views(f))

    def _inverted(self, st: Setting, cfg: Config, queries: np.ndarray, truth: V.Truth, c: "Cell") -> np.ndarray:
        """Invert each query's features to an image; score the images against the victims' (PSNR, SSIM; each
        victim against the image whose backbone features match its own best: scoring only), and return the
        server's queries: the logits of the images' own backbone features under the global model."""
        lb = st.lab
        # LoRA: a copy of the global model's adapted backbone (inversion freezes the module it is given)
        bb = copy.deepcopy(lb.model.backbone).eval() if lb.model.kind == "lora" else self.backbone(cfg)
        ds = lb.silos[self.plan.silo].silo.ds
        channels = 1 if ds.images is not None and ds.images.ndim == 3 else 3
        prior = self.prior_image(st, cfg, channels)
        imgs = invert.invert(bb, queries, cfg.size, channels=channels, iterations=self.plan.invert_iterations,
                             seed=self.plan.seed, start=prior)
        x = torch.from_numpy(imgs[:, None] if channels == 1 else imgs.transpose(0, 3, 1, 2).copy())
        dc = data_config(bb)
        with torch.inference_mode():
            f = bb(normalise(x, dc["mean"], dc["std"])).numpy()
        true = resize(load_batch(ds, truth.images, cfg.size), cfg.size)
        true = true[:, 0].numpy() if channels == 1 else true.permute(0, 2, 3, 1).numpy()
        clean = self._clean(lb, truth.images)
        m = metrics.hungarian(f, clean)
        for r, k in zip(m.rows, m.cols):
            p, q = invert.psnr_ssim(imgs[r], true[k])
            c.psnr.append(p)
            c.ssim.append(q)
        for k in range(len(true)):  # what the server's prior alone (its mean image) scores against the victims
            p, q = invert.psnr_ssim(prior, true[k])
            c.psnr_prior.append(p)
            c.ssim_prior.append(q)
        c.cosine_pixels.append(float(np.mean(np.diag(metrics.cosine_matrix(f, queries)))))
        if not self.grid:
            self.grid = {"victims": true[m.cols], "reconstructions": imgs[m.rows],
                         "title": "victims (top) and the server's reconstructions (bottom): trap + inversion"}
        return _encode_features(lb.model, f)

    def prior_image(self, st: Setting, cfg: Config, channels: int) -> np.ndarray:
        """The server's prior for inversion: the mean of its auxiliary images (another silo's)."""
        if self._prior is None:
            other = st.aux_silo
            x = resize(load_batch(other.silo.ds, other.silo.splits.train[:512], cfg.size), cfg.size).mean(0)
            self._prior = x[0].numpy() if channels == 1 else x.permute(1, 2, 0).numpy()
        return self._prior

    def backbone(self, cfg: Config) -> torch.nn.Module:
        if self._backbone is None:
            self._backbone = backbone_for(cfg.backbone, cfg.weights or None)[0]
        return self._backbone

    @staticmethod
    def _scaled(feats: np.ndarray, aux_norm: float | None, nonneg: bool) -> np.ndarray:
        """Candidates on the features' own terms: clipped at 0 (ReLU6 features) and at the auxiliary data's norm."""
        feats = np.clip(feats, 0, None) if nonneg else np.asarray(feats, np.float64)
        if aux_norm is None:
            return feats
        n = np.linalg.norm(feats, axis=1, keepdims=True)
        return np.divide(feats * aux_norm, n, out=np.zeros_like(feats), where=n > 0)

    # ------------------------------------------------------------------ one cell

    def cell(self, attack: str, epsilon: float, batch: int, steps: int, rng: np.random.Generator) -> Cell:
        cfg = config_at(self.scn.cfg, epsilon, batch, steps)
        c = Cell(attack, epsilon, batch, steps, delta=cfg.dp_delta if cfg.dp == "sample" else 0.0)
        if cfg.dp == "sample":
            try:  # the silo's own plan for a silo of `batch` images: refused when the target is out of reach
                c.history = accountant.silo_plan(cfg, batch, silo="the victim's silo").history()
            except ConfigError as e:
                c.note = str(e).split(";")[0]
                return c
        st = self.setting(cfg)
        lb, index = st.lab, st.index
        silo = lb.silos[self.plan.silo]
        c.n_db = len(index)
        if batch > silo.n_train:
            c.note = f"silo {silo.name} trains on {silo.n_train} images, fewer than the batch"
            return c
        sent = lb.model
        if attack == "invert" and (batch > self.plan.costly_max_batch or steps > 1):
            c.note = f"inversion runs at batches up to {self.plan.costly_max_batch}, one local step (its cost: seconds an image)"
            return c
        if attack == "matching" and batch > self.plan.costly_max_batch:
            c.note = f"matching runs at batches up to {self.plan.costly_max_batch} (its cost: seconds a trial)"
            return c
        if attack in ("trap", "invert"):
            if not trap.applies(lb.model):
                c.note = f"needs the probe head; the {lb.model.kind} head has no ReLU first layer or BatchNorm to craft"
                return c
            sent = self.crafted(st)
        if attack == "adapters" and lb.model.kind != "lora":
            c.note = f"the {lb.model.kind} head has no adapters: the adapters attack needs mode = \"lora\""
            return c
        if attack == "adapters" and (cfg.supervised or batch > self.plan.costly_max_batch):
            c.note = (f"the adapters attack runs unsupervised CroVCA at batches up to {self.plan.costly_max_batch} "
                      "(its cost: double backward through the backbone)")
            return c
        if attack == "breaching" and (lb.model.kind != "probe" or cfg.supervised or batch > self.plan.costly_max_batch
                                      or steps > 1):
            c.note = (f"the breaching reference attacks the probe head under unsupervised CroVCA, one local step (its "
                      f"objective here is one gradient), at batches up to {self.plan.costly_max_batch}")
            return c
        if attack == "labels" and not cfg.supervised:
            c.note = "label inference reads supervised CroVCA's prototype targets; the scenario is unsupervised"
            return c
        if attack == "statistics" and lb.model.pooling != "activations":
            c.note = "the DP head's statistics are released once under DP, never per round"
            return c
        aux, aux_norm, nonneg = st.aux, st.aux_norm, st.nonneg
        if cfg.dp == "client":
            c.note = ("client-level DP: the server adds the noise after it holds the update, so nothing in it "
                      "is hidden from the server (the silo only clips)")
        trials = self.plan.smallest_trials if (cfg.dp == "none" and batch == min(self.plan.batch_sizes)
                                               and steps == 1) else self.plan.trials
        if attack in ("matching", "breaching"):
            trials = min(trials, self.plan.matching_trials)
        if attack == "adapters":
            trials = min(trials, self.plan.adapters_trials)
        if attack == "invert":
            trials = min(trials, self.plan.invert_trials)
        t0 = time.perf_counter()
        victims = cell_rng(self.plan.seed, "victims", batch, steps)
        for _ in range(trials):
            pos = np.sort(victims.choice(silo.n_train, batch, replace=False))
            obs, truth = V.observe(lb, self.plan.silo, pos, cfg=cfg, model=sent, with_stats=attack == "statistics")
            if "epsilon_planned" in obs.metrics:
                c.epsilon_planned = float(obs.metrics["epsilon_planned"])
            if attack == "labels":
                ranked = labels.infer(obs, lb.model)
                guess = set(ranked[: min(batch, len(ranked))].tolist())
                c.label_accuracy.append(float(np.mean([int(v) in guess for v in _first_labels(truth.labels)])))
                c.label_chance.append(min(batch, len(ranked)) / len(ranked))
                c.trials += 1
                continue
            if attack == "statistics":
                q = statistics.mean_code(lb.model, obs.stats)  # one query
                hist = statistics.label_histogram(obs.stats)
                if hist is not None and truth.labels is not None:
                    y = np.asarray(truth.labels)
                    true = np.bincount(y, minlength=len(hist)) if y.ndim == 1 else y.sum(0)
                    c.label_exact.append(float(np.array_equal(np.asarray(true, float), hist)))
            elif attack == "adapters":
                q = self._adapters(st, cfg, obs, truth, c, rng)
            else:
                rec = analytic.recover(obs)
                if attack == "analytic":  # sign patterns: put them on the features' scale and sign
                    rec.features = self._scaled(rec.features, aux_norm, nonneg) if rec.space == "features" else rec.features
                if attack == "matching":  # refine the honest analytic candidates by matching the whole update
                    # (the DP head's candidates lie in its projected basis: it starts from auxiliary features)
                    start = self._scaled(rec.features, aux_norm, nonneg) if rec.space == "features" else None
                    ranked = labels.infer(obs, lb.model) if cfg.supervised else None  # iDLG's guess starts the labels
                    rec = matching.recover(obs, lb.model, aux, start=start, iterations=self.plan.matching_iterations,
                                           seed=int(rng.integers(1 << 31)), label_start=ranked)
                    if rec.labels is not None and truth.labels is not None:  # one guess an image, B in all
                        guess = set(rec.labels.tolist())
                        classes = int(np.isfinite(np.asarray(obs.prototypes)).all(axis=1).sum())
                        c.label_accuracy.append(float(np.mean([int(v) in guess for v in _first_labels(truth.labels)])))
                        c.label_chance.append(1 - (1 - 1 / classes) ** batch)  # B blind guesses name the class
                if attack == "breaching":  # the external reference, from the same start as matching
                    start = matching.starting_points(aux, self._scaled(rec.features, aux_norm, nonneg), batch,
                                                     seed=int(rng.integers(1 << 31)))
                    rec = reference.recover(obs, lb.model, iterations=self.plan.breaching_iterations, start=start)
                inputs = self._view_inputs(sent, truth)
                if rec.space == "projected":
                    with torch.inference_mode():
                        inputs = lb.model.net[0](torch.from_numpy(inputs)).numpy()
                mt = metrics.hungarian(rec.features, inputs, signed=rec.signed)  # scoring only
                c.cosine.append(mt.mean)
                c.exact.append(float(len(mt.cosine) >= 2 * batch and mt.cosine.min() >= 0.99))
                queries = self._queries(rec)
                q = (self._inverted(st, cfg, queries, truth, c) if attack == "invert"  # to pixels and back
                     else self._logits(lb, rec, queries))
                if attack == "trap" and rec.space == "features":  # what exact recovery can reach at best:
                    views = self._view_inputs(sent, truth, first_step=True)  # the true views, paired as the attack pairs them,
                    clean = self._clean(lb, truth.images).astype(np.float32)  # and the victims' clean features
                    for what, x in (("views", analytic.pair_views(views)), ("clean", clean)):
                        rid = metrics.reidentify(index, _encode_features(lb.model, x),
                                                 truth.images, k=10, model_version=VERSION)
                        c.ceiling.setdefault(what, []).append(rid.rate(10))
            rid = metrics.reidentify(index, q, truth.images, k=10, model_version=VERSION)
            c.top1.append(rid.rate(1))
            c.top10.append(rid.rate(10))
            c.chance1.append(rid.chance(1))
            c.chance10.append(rid.chance(10))
            c.trials += 1
        c.seconds = time.perf_counter() - t0
        return c


def cell_rng(seed: int, *key) -> np.random.Generator:
    """A generator of its own for each key: the victims of a batch size and number of steps (the same for
    every attack and privacy setting, so that rows compare on the same images), and each cell's attack
    seeds; adding an attack or a batch size to a plan moves no other row."""
    return np.random.default_rng([int(seed), zlib.crc32("/".join(map(str, key)).encode())])


def _encode_features(model: Hasher, features: np.ndarray) -> np.ndarray:
    """Logits of head inputs under the global model (LoRA: its head on the adapted backbone's features)."""
    head = model.head if model.kind == "lora" else model
    return head.encode_features(np.asarray(features, np.float32))


def _first_labels(y: np.ndarray) -> np.ndarray:
    """Each image's class (multi-label: its first label)."""
    y = np.asarray(y)
    return y if y.ndim == 1 else np.argmax(y, axis=1)


def _say(text: str) -> None:
    print(text, flush=True)


def cells(plan: Plan) -> list[tuple[str, float, int, int]]:
    return [(a, e, b, s) for e in plan.epsilons for a in plan.attacks for b in plan.batch_sizes
            for s in (plan.local_steps if a not in ("statistics", "labels") else (1,))]


def run_study(scn: Scenario, plan: Plan, *, runs_dir: str | Path = "runs",
              model: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The whole study into a new run folder. ``model``: attack that global model (a ``model.pt``); default:
    train the scenario's federation first (without DP) and attack its final model."""
    hasher = None
    if model is not None:  # checked before any work: a file, of the kind and length the scenario trains
        if not Path(model).exists():
            raise ConfigError(f"--model {model}: no such file; give a federated run's model.pt")
        hasher, _ = load_model(model)
        V.check_model(scn.cfg.replace(dp="none"), hasher, what=f"--model {model}")
    run_dir = new_run_dir(runs_dir, f"leakage-{scn.name}")
    if hasher is None:
        _say(f"training the federation to attack ({scn.cfg.num_server_rounds} rounds, no DP) into {run_dir / 'federation'}")
        hasher, _ = load_model(train_global(scn.cfg, run_dir / "federation"))
    study = Study(scn, plan, hasher)
    todo = cells(plan)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    _say(f"leakage lab: {len(todo)} cells on silo {plan.silo} of {scn.name}; folder {run_dir}")
    said: set[tuple] = set()
    for i, (a, e, b, s) in enumerate(todo, 1):
        c = study.cell(a, e, b, s, cell_rng(plan.seed, "attack", a, e, b, s))
        r = c.row()
        if not r["trials"] and (a, e, r["note"]) in said:
            continue  # one row says why an attack does not apply at this ε, not one per batch and step
        said.add((a, e, r["note"]))
        rows.append(r)
        _say(f"[{i}/{len(todo)}] {format_row(r)}")
        _write(run_dir, scn, plan, rows, time.perf_counter() - t0, done=False)
    summary = _write(run_dir, scn, plan, rows, time.perf_counter() - t0, done=True)
    figures(run_dir, rows, plan, study)
    return run_dir, summary


def _write(run_dir: Path, scn: Scenario, plan: Plan, rows, seconds: float, *, done: bool) -> dict[str, Any]:
    summary = {"scenario": scn.name, "source": scn.source, "config": scn.cfg.to_dict(),
               "plan": asdict(plan) | {"epsilons": [str(e) for e in plan.epsilons]}, "rows": rows,
               "seconds": round(seconds, 1), "status": "done" if done else "running"}
    atomic.write_json(run_dir / "leakage.json", summary)
    atomic.write_text(run_dir / "table.md", format_table(rows) + "\n")
    return summary


def _f(x: Any, nd: int = 3) -> str:
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def format_row(r: dict[str, Any]) -> str:
    s = (f"{r['attack']:<10} ε={_f(r['epsilon'], 0):>6} batch {r['batch']:>3} steps {r['steps']}: "
         f"cos {_f(r['cosine'])} top-1 {_f(r['top1'], 2)} top-10 {_f(r['top10'], 2)} "
         f"(chance {_f(r['chance_top10'], 3)})")
    if "bound_top10" in r:
        s += f" bound top-10 {_f(r['bound_top10'], 3)} (ε {_f(r['epsilon_planned'], 2)})"
    return s + (f"  [{r['note']}]" if r.get("note") else "")


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("| attack | target ε | batch | local steps | trials | cosine | all ≥ 0.99 | top-1 | top-10 | chance top-10 | "
            "silo's ε | DP bound top-1 | DP bound top-10 | top-10 of the true views / clean features | "
            "PSNR / SSIM | labels (chance) | note |")
    out = [head, "|" + "|".join(["---"] * 17) + "|"]
    for r in rows:
        out.append("| " + " | ".join([
            r["attack"], _f(r["epsilon"], 0), str(r["batch"]), str(r["steps"]), str(r["trials"]), _f(r["cosine"]),
            _f(r["exact"], 2),
            _f(r["top1"], 2), _f(r["top10"], 2), _f(r["chance_top10"], 3), _f(r["epsilon_planned"], 2),
            _f(r.get("bound_top1"), 3), _f(r.get("bound_top10"), 3),
            f"{_f(r['top10_true_views'], 2)} / {_f(r.get('top10_true_clean'), 2)}" if "top10_true_views" in r else "–",
            f"{_f(r['psnr'], 1)} dB / {_f(r['ssim'], 3)} (prior {_f(r['psnr_prior'], 1)} / {_f(r['ssim_prior'], 3)})"
            if "psnr" in r else "–",
            (f"{_f(r['label_accuracy'], 2)} ({_f(r['label_chance'], 2)})" if "label_accuracy" in r else
             f"histogram exact in {_f(r['label_histogram_exact'], 2)}" if "label_histogram_exact" in r else "–"),
            r.get("note", "")]) + " |")
    return "\n".join(out)


def figures(run_dir: Path, rows: list[dict[str, Any]], plan: Plan, study: Study) -> None:
    nodp = [r for r in rows if r["epsilon"] == math.inf and r["trials"]]
    curves = {}
    for a in plan.attacks:
        for s in plan.local_steps if a != "statistics" else (1,):
            pts = sorted((r["batch"], r["top10"]) for r in nodp if r["attack"] == a and r["steps"] == s)
            if pts:
                curves[f"{a}, {s} step{'s' if s > 1 else ''}"] = ([p[0] for p in pts], [p[1] for p in pts])
    chance = sorted((r["batch"], r["chance_top10"]) for r in nodp if r["attack"] == plan.attacks[0] and r["steps"] == 1)
    plots.plot_leakage_batches(curves, run_dir / "reid_vs_batch.png",
                               chance=([c[0] for c in chance], [c[1] for c in chance]) if chance else None)
    b0 = min(plan.batch_sizes)
    dp = {}
    bound, chance_dp = [], []
    for a in plan.attacks:
        pts = sorted((r["epsilon_planned"], r["top10"], r.get("bound_top10"), r["chance_top10"]) for r in rows
                     if r["attack"] == a and r["batch"] == b0 and r["steps"] == 1 and r["trials"]
                     and "bound_top10" in r)
        if pts:
            dp[a] = ([p[0] for p in pts], [p[1] for p in pts])
            bound = bound or [(p[0], p[2]) for p in pts]
            chance_dp = chance_dp or [(p[0], p[3]) for p in pts]
    nodp_level = {r["attack"]: r["top10"] for r in nodp if r["batch"] == b0 and r["steps"] == 1}
    if study.grid:
        plots.plot_image_pairs(study.grid["victims"], study.grid["reconstructions"],
                               run_dir / "reconstructions.png", title=study.grid["title"])
    plots.plot_leakage_epsilon(dp, run_dir / "reid_vs_epsilon.png", bound=([b[0] for b in bound], [b[1] for b in bound]),
                               chance=([c[0] for c in chance_dp], [c[1] for c in chance_dp]), no_dp=nodp_level, batch=b0)
