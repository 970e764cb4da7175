"""Empirical privacy audit of DP-SGD: canary runs, a membership-inference test, a lower bound on ε.

Jagielski, Ullman and Oprea, "Auditing Differentially Private Machine Learning: How Private is Private
SGD?", NeurIPS 2020 (arXiv:2006.07709); Nasr, Song, Thakurta, Papernot and Carlini, "Adversary
Instantiation: Lower Bounds for Differentially Private Machine Learning", IEEE S&P 2021 (arXiv:2101.04535).

**The bound.** If training ``M`` is (ε, δ)-DP, then for the neighbouring datasets ``D`` and ``D ∪ {c}`` (a
canary ``c``) and any test "``c`` was in" with false-positive rate FPR (on runs without ``c``) and
false-negative rate FNR (on runs with it), both ``1 − FNR ≤ e^ε FPR + δ`` and ``1 − FPR ≤ e^ε FNR + δ``, so

    ε ≥ max( log((1 − δ − FNR) / FPR),  log((1 − δ − FPR) / FNR) ).

The rates are estimated from independent training runs (each run is one trial; half of them, a seeded
random half, train with the canary): with ``k`` false positives among ``n`` runs without the canary, the
Clopper–Pearson upper bound ``FPR_hi`` at level ``1 − α/2`` (and ``FNR_hi`` likewise) hold together with
probability ≥ ``1 − α`` (``confidence = 1 − α``), and replacing FPR and FNR by them in the formula gives a
lower bound on ε that holds with that confidence. It is reported next to the accountant's ε for the same
σ, sample rate, steps and δ (:mod:`sgdlab.privacy.accounting`); a bound above it shows the mechanism or
its accounting is broken (at that confidence).

**The test** (a score of the final model; "in" when it is at least a threshold):

* ``loss``: minus the canary's loss (Yeom et al. 2018's loss threshold: a member has a lower loss);
* ``lira``: the log-likelihood ratio of that score under Gaussians fitted to the calibration runs with
  and without the canary (Carlini et al. 2022's LiRA, those runs being its shadow models);
* ``gradient`` (the default; white-box: Nasr et al. find audits tight when the adversary's capabilities
  are full and weaker the less it sees): how far training moved the weights along the canary's own
  descent direction, ``s = −⟨θ_T − θ_0, g_c⟩_S / ‖g_c‖_S`` with ``g_c`` the canary's gradient at the initial
  weights, over the coordinates ``S`` no training example reaches: for the ``blank`` canary the first-layer
  weights of the blank pixels (which nothing but the canary and the noise moves, so without noise the runs
  without it score exactly 0); for ``mislabel`` all coordinates.

The threshold is chosen on a separate set of **calibration runs** (``calibration`` of the runs, default
half) as the one with the largest bound there (ties: the largest TPR − FPR), and the bound is computed on
the other runs only, as Jagielski et al.'s code does (``code/bkd_parser.py``: a threshold searched on the
first runs, Clopper–Pearson at 99 % on the rest); choosing it on the evaluation runs would overstate the
bound.

**The setup** (the strongest cheap one, following Jagielski et al.'s and Nasr et al.'s observation that
worst-case canaries give the tightest audits): ``digits`` (``train_size`` examples, a seeded subset), a
small MLP, the same initial weights in every run (the auditor knows the initialisation), and a canary of
kind ``blank`` — an image that is 10 (ten times the data's range) on the three pixels that are zero in
every digits image and 0 elsewhere, with label 0 (out of distribution: in runs without it nothing but the
noise moves the first-layer weights of those pixels; at 10 most of its clipped gradient falls on them), or
``mislabel``, a held-out digits image with a wrong label. Training is sgdlab's DP-SGD engine
(:class:`~sgdlab.privacy.DPSGD`: Poisson sampling at rate ``q = batch_size / (train_size + 1)`` in every run,
per-example clipping, Gaussian noise) followed by plain SGD, for ``steps`` steps, as
:class:`~sgdlab.privacy.PrivateTraining` does in a run; the accountant gets σ, q, steps and δ.

How this differs from the papers: one canary inserted once (Jagielski et al. also insert k poisoning
copies and divide the bound by k), default confidence 95 % (their code: 99 %), and a few hundred runs of a
tiny model rather than thousands of real ones: with ``n`` evaluation runs per side the bound can reach at
most about ``log(n / 3.7)`` at 95 % confidence, so the audit can only catch claims of ε below that.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, UnknownNameError, check_range
from . import accounting
from .dpsgd import DPSGD, PoissonSampler, _seed

CANARIES = ("blank", "mislabel")
TESTS = ("gradient", "loss", "lira")
BLANK_PIXELS = (0, 32, 39)  # zero in every image of scikit-learn's digits
BLANK_VALUE = 10.0  # the canary's value there: most of its clipped gradient then falls on those pixels' weights


# ---- the statistics ------------------------------------------------------------------------------
def clopper_pearson_upper(k: int, n: int, level: float) -> float:
    """The one-sided Clopper–Pearson upper bound on a binomial rate at confidence ``level`` from ``k``
    successes in ``n`` trials: the ``p`` with ``P[Bin(n, p) ≤ k] = 1 − level`` (1 when ``k = n``)."""
    check_range("n", n, low=1, integer=True)
    check_range("k", k, low=0, high=n, integer=True)
    check_range("level", level, low=0, high=1, low_open=True, high_open=True)
    if k == n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(level, k + 1, n - k))


def epsilon_lower_bound(fp: int, negatives: int, fn: int, positives: int, delta: float = 0.0,
                        confidence: float = 0.95) -> dict[str, float]:
    """The empirical lower bound on ε from ``fp`` false positives among ``negatives`` runs without the
    canary and ``fn`` false negatives among ``positives`` runs with it (see the module docstring).

    Returns ``epsilon_lb`` (≥ 0) with the point rates and their upper bounds ``fpr_hi``, ``fnr_hi``
    (each at level ``1 − (1 − confidence)/2``, jointly at ``confidence``)."""
    check_range("delta", delta, low=0, high=1, high_open=True)
    check_range("confidence", confidence, low=0, high=1, low_open=True, high_open=True)
    level = 1 - (1 - confidence) / 2
    fpr_hi = clopper_pearson_upper(fp, negatives, level)
    fnr_hi = clopper_pearson_upper(fn, positives, level)
    eps = 0.0
    for num, den in ((1 - delta - fnr_hi, fpr_hi), (1 - delta - fpr_hi, fnr_hi)):
        if num > 0 and den > 0:
            eps = max(eps, math.log(num / den))
    return {"epsilon_lb": eps, "fpr": fp / negatives, "fnr": fn / positives, "fpr_hi": fpr_hi, "fnr_hi": fnr_hi}


def best_threshold(scores_in: list[float], scores_out: list[float], delta: float, confidence: float) -> float:
    """The threshold t ("in" when score ≥ t) with the largest bound on these (calibration) scores; ties (as
    when every bound is 0 on few runs) go to the largest TPR − FPR, then to the lowest threshold."""
    values = sorted(set(scores_in) | set(scores_out))
    cuts = [values[0] - 1.0] + [(a + b) / 2 for a, b in zip(values[:-1], values[1:], strict=True)]
    cuts.append(values[-1] + 1.0)
    best, best_t = (-1.0, -2.0), cuts[0]
    for t in cuts:
        fp = sum(s >= t for s in scores_out)
        fn = sum(s < t for s in scores_in)
        eps = epsilon_lower_bound(fp, len(scores_out), fn, len(scores_in), delta, confidence)["epsilon_lb"]
        key = (eps, (1 - fn / len(scores_in)) - fp / len(scores_out))
        if key > best:
            best, best_t = key, t
    return best_t


def _gaussian_llr(mu_in: float, sd_in: float, mu_out: float, sd_out: float, s: float) -> float:
    def logpdf(x: float, mu: float, sd: float) -> float:
        return -0.5 * ((x - mu) / sd) ** 2 - math.log(sd)

    return logpdf(s, mu_in, sd_in) - logpdf(s, mu_out, sd_out)


# ---- the audit -----------------------------------------------------------------------------------
@dataclass
class AuditOptions:
    runs: int = 200            # training runs (half with the canary)
    calibration: float = 0.5   # fraction of the runs that choose the threshold (the rest give the bound)
    train_size: int = 64       # digits training examples besides the canary
    batch_size: int = 16       # expected batch L; sample rate q = L / (train_size + 1)
    steps: int = 20
    lr: float = 2.0            # SGD on the private gradient (mean over the expected batch)
    noise: float = 4.0         # σ
    clip: float = 1.0          # C
    delta: float = 1e-5
    confidence: float = 0.95
    canary: str = "blank"
    test: str = "gradient"
    hidden: int = 16           # width of the digits MLP
    accountant: str = accounting.DEFAULT_ACCOUNTANT
    seed: int = 0

    def validate(self) -> None:
        check_range("runs", self.runs, low=8, integer=True)
        check_range("calibration", self.calibration, low=0, high=1, low_open=True, high_open=True)
        check_range("train_size", self.train_size, low=1, high=1000, integer=True)
        check_range("batch_size", self.batch_size, low=1, high=self.train_size + 1, integer=True)
        check_range("steps", self.steps, low=1, integer=True)
        check_range("lr", self.lr, low=0, low_open=True)
        check_range("noise", self.noise, low=0, low_open=True)
        check_range("clip", self.clip, low=0, low_open=True)
        check_range("delta", self.delta, low=0, high=1, low_open=True, high_open=True)
        check_range("confidence", self.confidence, low=0, high=1, low_open=True, high_open=True)
        check_range("hidden", self.hidden, low=1, integer=True)
        for key in ("lr", "noise", "clip"):
            if math.isinf(getattr(self, key)):
                raise ConfigError(f"{key} must be finite, got {getattr(self, key)!r}")
        if self.canary not in CANARIES:
            raise UnknownNameError("canary", self.canary, CANARIES)
        if self.test not in TESTS:
            raise UnknownNameError("membership test", self.test, TESTS)
        if self.accountant not in accounting.ACCOUNTANTS:
            raise UnknownNameError("accountant", self.accountant, accounting.ACCOUNTANTS)
        n_cal = int(self.runs * self.calibration)
        if min(n_cal, self.runs - n_cal) < 4:
            raise ConfigError(f"runs={self.runs} with calibration={self.calibration} leaves {n_cal} calibration and "
                              f"{self.runs - n_cal} evaluation runs; each needs at least 4")


def _data(opts: AuditOptions, task: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y) of the training subset and the canary (x_c, y_c)."""
    g = torch.Generator().manual_seed(opts.seed)
    perm = torch.randperm(task.num_train, generator=g)
    x, y = task.x_train[perm[:opts.train_size]], task.y_train[perm[:opts.train_size]]
    if opts.canary == "blank":
        xc = torch.zeros(1, 64)
        xc[0, list(BLANK_PIXELS)] = BLANK_VALUE
        yc = torch.zeros(1, dtype=torch.long)
    else:  # an unused training image with the next label
        j = perm[opts.train_size]
        xc, yc = task.x_train[j:j + 1], (task.y_train[j:j + 1] + 1) % 10
    return x, y, xc, yc


def run_audit(opts: AuditOptions, *, _mechanism_noise: float | None = None) -> dict[str, Any]:
    """Train ``opts.runs`` models (each with its own seed; a seeded random half with the canary), score the
    canary under each, and bound ε. ``_mechanism_noise`` (tests only) is the σ the engine actually adds
    while the accountant is still told ``opts.noise``: 0 makes a broken mechanism the audit must catch."""
    opts.validate()
    start = time.perf_counter()
    from .. import tasks

    task = tasks.create("digits", {"model": "mlp", "hidden": opts.hidden})
    x, y, xc, yc = _data(opts, task)
    torch.manual_seed(opts.seed)
    model = task.build_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    n = opts.train_size + 1
    q = opts.batch_size / n
    sigma = opts.noise if _mechanism_noise is None else _mechanism_noise
    loss_fn = task.loss
    g_c, support = _canary_direction(model, loss_fn, xc, yc, opts.canary == "blank")
    engine = DPSGD(model, task.loss, noise_multiplier=sigma, max_grad_norm=opts.clip,
                   expected_batch_size=opts.batch_size, seed=opts.seed)
    g = torch.Generator().manual_seed(opts.seed + 1)
    members = torch.zeros(opts.runs, dtype=torch.bool)
    members[torch.randperm(opts.runs, generator=g)[:opts.runs // 2]] = True
    with_c = (torch.cat([x, xc]), torch.cat([y, yc]))
    scores = []
    opt = torch.optim.SGD(model.parameters(), lr=opts.lr)  # stateless: one for all runs
    for r in range(opts.runs):
        model.load_state_dict(init)
        engine.sample_generator.manual_seed(_seed(opts.seed * 1_000_003 + r, "sample"))
        engine.noise_generator.manual_seed(_seed(opts.seed * 1_000_003 + r, "noise"))
        data = with_c if members[r] else (x, y)
        sampler = PoissonSampler(len(data[1]), q, engine.sample_generator)
        for _ in range(opts.steps):
            idx = sampler.next()
            engine.backward((data[0][idx], data[1][idx]))
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if opts.test == "gradient":
                moved = torch.cat([(p - init[k]).flatten() for k, p in model.named_parameters()])
                scores.append(-(moved[support] @ g_c[support]).item() / g_c[support].norm().item())
            else:
                scores.append(-F.cross_entropy(model(xc), yc).item())
    n_cal = int(opts.runs * opts.calibration)
    cal, ev = range(n_cal), range(n_cal, opts.runs)
    cal_in = [scores[i] for i in cal if members[i]]
    cal_out = [scores[i] for i in cal if not members[i]]
    ev_in = [scores[i] for i in ev if members[i]]
    ev_out = [scores[i] for i in ev if not members[i]]
    if min(len(cal_in), len(cal_out), len(ev_in), len(ev_out)) < 2:
        raise ConfigError(f"runs={opts.runs}: too few runs with or without the canary in the calibration or "
                          "evaluation part; use more runs")
    statistic = ("canary-direction weight movement" if opts.test == "gradient" else "minus canary loss")
    if opts.test == "lira":
        stats = [(sum(v) / len(v), max(_std(v), 1e-6)) for v in (cal_in, cal_out)]
        (mi, si), (mo, so) = stats

        def llr(vals: list[float]) -> list[float]:
            return [_gaussian_llr(mi, si, mo, so, s) for s in vals]

        cal_in, cal_out, ev_in, ev_out = llr(cal_in), llr(cal_out), llr(ev_in), llr(ev_out)
        statistic = "Gaussian log-likelihood ratio of minus canary loss"
    t = best_threshold(cal_in, cal_out, opts.delta, opts.confidence)
    fp = sum(s >= t for s in ev_out)
    fn = sum(s < t for s in ev_in)
    bound = epsilon_lower_bound(fp, len(ev_out), fn, len(ev_in), opts.delta, opts.confidence)
    eps = accounting.epsilon(opts.noise, q, opts.steps, opts.delta, opts.accountant)
    return {"options": asdict(opts), "mechanism_noise": sigma, "sample_rate": q, "statistic": statistic,
            "threshold": t, "calibration_runs": n_cal, "evaluation_in": len(ev_in), "evaluation_out": len(ev_out),
            "false_positives": fp, "false_negatives": fn, **bound, "epsilon_accountant": eps,
            "violation": bound["epsilon_lb"] > eps, "scores": scores, "members": members.tolist(),
            "seconds": time.perf_counter() - start}


def _canary_direction(model: torch.nn.Module, loss_fn: Any, xc: torch.Tensor, yc: torch.Tensor,
                      blank: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The canary's flat gradient at the current weights and the coordinates the score uses (a bool mask):
    for the ``blank`` canary its non-zeros among the first layer's weights of the blank pixels (no training
    image reaches them), otherwise all of its non-zeros."""
    params = list(model.parameters())
    g_c = torch.cat([g.flatten() for g in torch.autograd.grad(loss_fn(model, (xc, yc)), params)])
    support = g_c != 0
    if blank:
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        only = [torch.zeros_like(p, dtype=torch.bool) for p in params]
        k = next(i for i, p in enumerate(params) if p is first.weight)
        only[k][:, list(BLANK_PIXELS)] = True
        support &= torch.cat([m.flatten() for m in only])
    return g_c, support


def _std(v: list[float]) -> float:
    m = sum(v) / len(v)
    return math.sqrt(sum((a - m) ** 2 for a in v) / max(len(v) - 1, 1))


def format_table(r: dict[str, Any]) -> str:
    o = r["options"]
    conf = f"{o['confidence']:.0%}"
    head = (f"audit: {o['runs']} DP-SGD runs on digits ({o['train_size']} examples + canary {o['canary']}, MLP "
            f"{o['hidden']}), sigma={o['noise']:g}, clip={o['clip']:g}, q={r['sample_rate']:.4g}, "
            f"{o['steps']} steps; test {o['test']} ({r['statistic']}), threshold from {r['calibration_runs']} "
            f"calibration runs, bound from {r['evaluation_in']} runs with and {r['evaluation_out']} without the "
            "canary")
    row = (f"{'FPR':>6} {'FNR':>6} {'FPR_hi':>7} {'FNR_hi':>7} {'eps_lb (' + conf + ')':>14} "
           f"{'eps (' + o['accountant'] + ', delta=' + format(o['delta'], 'g') + ')':>22}")
    vals = (f"{r['fpr']:>6.3f} {r['fnr']:>6.3f} {r['fpr_hi']:>7.3f} {r['fnr_hi']:>7.3f} {r['epsilon_lb']:>14.3f} "
            f"{r['epsilon_accountant']:>22.3f}")
    verdict = ("VIOLATION: the empirical lower bound exceeds the accountant's epsilon" if r["violation"] else
               "consistent: the empirical lower bound does not exceed the accountant's epsilon")
    return "\n".join([head, row, vals, f"{verdict} ({r['seconds']:.1f} s)"])


# ---- command line: ``sgdlab audit`` ------------------------------------------------------------------
def add_arguments(p: Any) -> None:
    d = AuditOptions()
    p.add_argument("--runs", type=int, default=d.runs, help=f"training runs, half with the canary (default {d.runs})")
    p.add_argument("--calibration", type=float, default=d.calibration,
                   help=f"fraction of runs that choose the threshold (default {d.calibration})")
    p.add_argument("--dp", default=f"noise={d.noise:g},clip={d.clip:g}", metavar="noise=S,clip=C[,delta=D]",
                   help="the DP-SGD setting audited (default noise=4,clip=1; delta 1e-5)")
    p.add_argument("--train-size", type=int, default=d.train_size, help="digits training examples besides the canary")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="expected (Poisson) batch size")
    p.add_argument("--steps", type=int, default=d.steps, help="DP-SGD steps per run")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    p.add_argument("--hidden", type=int, default=d.hidden, help="width of the digits MLP")
    p.add_argument("--canary", default=d.canary, choices=CANARIES,
                   help="blank: lit only on pixels that are 0 in every digit (out of distribution); mislabel")
    p.add_argument("--test", default=d.test, choices=TESTS,
                   help="gradient (white-box, default), loss (threshold) or lira (likelihood ratio of the loss)")
    p.add_argument("--confidence", type=float, default=d.confidence, help="confidence of the bound (default 0.95)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=None, help="directory for audit.json (default: print only)")


def main(args: Any) -> int:
    from .options import DPOptions

    dp = DPOptions.parse(args.dp)
    if dp.noise is None:
        raise ConfigError("audit --dp needs noise=SIGMA (the noise multiplier audited), not target_epsilon")
    opts = AuditOptions(runs=args.runs, calibration=args.calibration, train_size=args.train_size,
                        batch_size=args.batch_size, steps=args.steps, lr=args.lr, noise=dp.noise, clip=dp.clip,
                        delta=dp.delta, confidence=args.confidence, canary=args.canary, test=args.test,
                        hidden=args.hidden, accountant=dp.accountant, seed=args.seed)
    report = run_audit(opts)
    print(format_table(report))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out / 'audit.json'}")
    return 0
