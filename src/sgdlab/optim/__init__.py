"""Optimizers by name.

``create(name, params, **hyperparameters)`` returns a ``torch.optim.Optimizer``. Every registered
optimizer follows torch.optim conventions (param groups, ``state_dict``, LR schedulers). An unknown
hyperparameter is a ``TypeError``; one of the wrong type (checked against the optimizer's signature,
:func:`check_hyperparameters`) a :class:`HyperparameterTypeError` (a ``TypeError`` and a ``ConfigError``);
an out-of-range one is a ``ValueError`` naming it. sgdlab's own
optimizers derive from :class:`sgdlab.optim._base.Optimizer` (one ``step``, one validation, one
sparse-gradient error, :class:`SparseGradientError`); what an optimizer needs from the training loop
beyond ``backward(); step()`` it declares through :mod:`sgdlab.optim.protocol`.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..errors import ConfigError
from ..registry import Registry

__all__ = ["create", "registry", "hyperparameters", "check", "check_hyperparameters", "HyperparameterTypeError",
           "state_bytes", "SparseGradientError", "expect_steps",
           "param_groups", "AdamP", "SGDP", "AdEMAMix", "AuON", "HybridAuON",
           "DiffGrad", "FRUGAL", "Grams", "LaProp", "Lookahead", "MARS", "Muon", "SGDSaI", "SophiaG", "SophiaH", "SWAN"]

registry: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")

registry.register("sgd", torch.optim.SGD, "torch.optim.SGD: plain SGD, heavy-ball or Nesterov momentum",
                  default_lr=0.1)
registry.register("adam", torch.optim.Adam, "torch.optim.Adam (Kingma & Ba, 2015)", default_lr=1e-3)
registry.register("adamw", torch.optim.AdamW, "torch.optim.AdamW: Adam with decoupled weight decay "
                  "(Loshchilov & Hutter, 2019)", default_lr=1e-3)

from ._base import SparseGradientError, expect_steps  # noqa: E402  (expect_steps: the run's length hint)
from ._matrix import param_groups  # noqa: E402  (groups for Muon/SWAN/AuON/FRUGAL from a model)
from .adamp import SGDP, AdamP  # noqa: E402
from .ademamix import AdEMAMix  # noqa: E402
from .auon import AuON, HybridAuON  # noqa: E402
from .diffgrad import DiffGrad  # noqa: E402
from .frugal import FRUGAL  # noqa: E402
from .grams import Grams  # noqa: E402
from .laprop import LaProp  # noqa: E402
from .lookahead import Lookahead, lookahead  # noqa: E402
from .mars import MARS  # noqa: E402
from .muon import Muon  # noqa: E402
from .sgd_sai import SGDSaI  # noqa: E402
from .sophia import SophiaG, SophiaH  # noqa: E402
from .swan import SWAN  # noqa: E402

registry.register("sgd-sai", SGDSaI, "SGD-SaI: SGD with momentum, per-tensor lr scaled once by the first "
                  "gradient's g-SNR (Xu et al., 2024, arXiv:2412.11768)", default_lr=1e-2)
registry.register("swan", SWAN, "SWAN: stateless row-wise GradNorm + Newton-Schulz GradWhitening, AdamW for "
                  "non-matrix params (Ma et al., 2024, arXiv:2412.13148)", default_lr=1e-3)
registry.register("diffgrad", DiffGrad, "diffGrad: Adam with a gradient-change friction coefficient "
                  "(Dubey et al., 2020, arXiv:1909.11015)", default_lr=1e-3)
registry.register("adamp", AdamP, "AdamP: Adam without the radial update on scale-invariant weights "
                  "(Heo et al., ICLR 2021)", default_lr=1e-3)
registry.register("sgdp", SGDP, "SGDP: momentum SGD without the radial update on scale-invariant weights "
                  "(Heo et al., ICLR 2021)", default_lr=0.1)
registry.register("frugal", FRUGAL, "FRUGAL: Adam in a low-dimensional subspace (GaLore SVD or BAdam blocks) + "
                  "signSGD/SGD on the rest, full-rank update (Zmushko et al., 2024, arXiv:2411.07837)",
                  default_lr=1e-3)
registry.register("sophia-g", SophiaG, "Sophia-G: clipped diagonal-Hessian preconditioning, Gauss-Newton-"
                  "Bartlett estimator (Liu et al., 2023, arXiv:2305.14342)", default_lr=3e-4)
registry.register("sophia-h", SophiaH, "Sophia-H: clipped diagonal-Hessian preconditioning, Hutchinson "
                  "estimator; needs step(closure) (Liu et al., 2023, arXiv:2305.14342)", default_lr=3e-4)
registry.register("auon", AuON, "AuON: momentum normalised then divided by its cosh-RMS, linear time "
                  "(Maity, 2025, arXiv:2509.24320)", default_lr=0.08)
registry.register("hybrid-auon", HybridAuON, "Hybrid-AuON: AuON with one quintic Newton-Schulz step "
                  "(Maity, 2025, arXiv:2509.24320)", default_lr=0.08)
registry.register("muon", Muon, "Muon: Newton-Schulz-orthogonalised Nesterov momentum for matrices, AdamW for "
                  "the rest (Jordan et al., 2024; Liu et al., 2025, arXiv:2502.16982)", default_lr=0.02)
registry.register("ademamix", AdEMAMix, "AdEMAMix: Adam with a mixture of fast and slow gradient EMAs "
                  "(Pagliardini, Ablin & Grangier, 2024, arXiv:2409.03137)", default_lr=1e-3)
registry.register("mars", MARS, "MARS-AdamW (approx.): AdamW on clipped, scaled stochastic recursive momentum "
                  "(Yuan et al., 2024, arXiv:2411.10438)", default_lr=3e-3)
registry.register("grams", Grams, "Grams: gradient-sign direction with Adam-moment magnitude "
                  "(Cao, Li & Song, 2024, arXiv:2412.17107)", default_lr=1e-3)
registry.register("laprop", LaProp, "LaProp: momentum over RMS-normalised gradients (Ziyin et al., 2020, "
                  "arXiv:2002.04839)", default_lr=4e-4)
registry.register("lookahead", lookahead, "Lookahead around any registered optimizer (base=NAME): k fast steps, "
                  "then slow += alpha*(fast - slow) (Zhang et al., NeurIPS 2019)", default_lr=None, wraps=True)

# --- issue 16, O15/O19: NAG-GS, DoG/L-DoG, Gravity, random-scaling SGDM, AdaMomentum, median/coordinate
# clipping, PSPS ---
from .adamomentum import AdaMomentum  # noqa: E402
from .coord_clip import CoordClipSGD  # noqa: E402
from .dog import DoG, LDoG  # noqa: E402
from .gravity import Gravity  # noqa: E402
from .median_sgd import MedianSGD  # noqa: E402
from .nag_gs import NAGGS  # noqa: E402
from .psps import PSPS  # noqa: E402
from .random_scaling import RandomScalingSGDM  # noqa: E402

__all__ += ["AdaMomentum", "CoordClipSGD", "DoG", "LDoG", "Gravity", "MedianSGD", "NAGGS", "PSPS",
            "RandomScalingSGDM"]
registry.register("nag-gs", NAGGS, "NAG-GS: semi-implicit Gauss-Seidel accelerated gradient flow (Leplat et al., "
                  "2022, arXiv:2209.14937)", default_lr=0.05)
registry.register("dog", DoG, "DoG: parameter-free SGD, step = max distance from start / sqrt(sum of squared "
                  "gradient norms), per group; lr is a multiplier (Ivgi et al., ICML 2023)", default_lr=1.0)
registry.register("l-dog", LDoG, "L-DoG: layer-wise DoG, one parameter-free step size per tensor (Ivgi et al., "
                  "ICML 2023, arXiv:2302.12022)", default_lr=1.0)
registry.register("gravity", Gravity, "Gravity: velocity EMA of the gradient squashed by the tensor's max entry "
                  "(Bahrami & Pouriyan Zadeh, 2021, arXiv:2101.09192)", default_lr=0.1)
registry.register("rs-sgdm", RandomScalingSGDM, "Random-scaling SGDM: EMA-momentum SGD, each step times s ~ Exp(1) "
                  "(Zhang & Cutkosky, ICML 2024, arXiv:2405.09742)", default_lr=0.01)
registry.register("adamomentum", AdaMomentum, "AdaMomentum: Adam whose second moment is an EMA of the squared "
                  "momentum (Wang et al., arXiv:2106.11514)", default_lr=1e-3)
registry.register("median-sgd", MedianSGD, "Median SGD: SGD on a clipped (proximal-point) momentum that tracks the "
                  "median gradient (Schaipp et al., TMLR 2025, arXiv:2402.12828)", default_lr=0.1)
registry.register("coord-clip", CoordClipSGD, "Coordinate-wise clipped SGD(M): the top clip_fraction of update "
                  "coordinates clipped to the group's quantile (Pan & Li, 2023, arXiv:2306.00204)", default_lr=0.1)
registry.register("psps", PSPS, "PSPS: SGD with a Hutchinson-preconditioned stochastic Polyak step size; needs "
                  "step(closure); lr is a multiplier (Abdukhakimov et al., 2023, arXiv:2310.02093)", default_lr=1.0)

from .mtdao import MTAdamW  # noqa: E402  (issue 15, D8)

registry.register("mtdao", MTAdamW, "MT-DAO's multi-timescale AdamW: N first moments at their own betas, "
                  "weighted with the gradient (Iacob et al., 2025, arXiv:2510.05361)", default_lr=1e-3)

# --- issue 16, O17/O18: SAM, SAF/MESA, SWA, SWAD (wrappers of base=NAME), zeroth-order SGD, forward gradients ---
from .forward_gradient import ForwardGradient  # noqa: E402
from .saf import MESA, SAF, mesa, saf  # noqa: E402
from .sam import SAM, sam  # noqa: E402
from .swa import SWA, swa  # noqa: E402
from .swad import SWAD, swad  # noqa: E402
from .zo_sgd import ZOSGD  # noqa: E402

__all__ += ["ForwardGradient", "MESA", "SAF", "SAM", "SWA", "SWAD", "ZOSGD"]
registry.register("sam", sam, "SAM around any registered optimizer (base=NAME, default sgd): step with the gradient "
                  "at w + rho g/||g|| (adaptive: ASAM); needs step(closure), 2x cost (Foret et al., ICLR 2021)",
                  default_lr=None, wraps=True)
registry.register("saf", saf, "SAF around any registered optimizer (base=NAME): + KL to each example's logits from "
                  "minus_epochs epochs ago, at base cost; needs example ids (Du et al., NeurIPS 2022)",
                  default_lr=None, wraps=True)
registry.register("mesa", mesa, "MESA around any registered optimizer (base=NAME): + KL to an EMA teacher's logits "
                  "on the same batch, no ids (Du et al., NeurIPS 2022, arXiv:2205.14083)", default_lr=None, wraps=True)
registry.register("swa", swa, "SWA around any registered optimizer (base=NAME): evaluate the running mean of the "
                  "iterates from swa_start every swa_freq steps (Izmailov et al., UAI 2018)", default_lr=None,
                  wraps=True)
registry.register("swad", swad, "SWAD around any registered optimizer (base=NAME): dense averaging over the "
                  "validation-loss valley (Cha et al., NeurIPS 2021, arXiv:2102.08604)", default_lr=None, wraps=True)
registry.register("zo-sgd", ZOSGD, "Zeroth-order SGD (MeZO): two-point SPSA with seeded in-place perturbations, no "
                  "backward, inference memory (Malladi et al., NeurIPS 2023, arXiv:2305.17333)", default_lr=1e-3)
registry.register("forward-gradient", ForwardGradient, "Forward-gradient SGD: (grad f . v) v by forward-mode AD, "
                  "no backward (Baydin et al., 2022, arXiv:2202.08587)", default_lr=1e-3)

# --- issue 16, O14/O16: M-FAC, Shampoo, PSGD Kron, XGrad (a wrapper of base=sgd|adam|adamw) ---
from .kron import Kron  # noqa: E402
from .mfac import MFAC  # noqa: E402
from .shampoo import Shampoo  # noqa: E402
from .xgrad import XGrad, xgrad  # noqa: E402

__all__ += ["Kron", "MFAC", "Shampoo", "XGrad"]
registry.register("mfac", MFAC, "M-FAC: inverse damped empirical Fisher of a sliding window of ngrads gradients "
                  "times the gradient, the dynamic algorithm (Frantar et al., NeurIPS 2021)", default_lr=1e-3)
registry.register("shampoo", Shampoo, "Shampoo as Distributed Shampoo runs it: blocked Kronecker-factored inverse "
                  "roots by eigh, grafted step norm, root frequency, start step (Gupta et al., 2018; Shi et al., "
                  "2023)", default_lr=1e-2)
registry.register("kron", Kron, "PSGD Kron: momentum preconditioned by a Kronecker product of triangular/diagonal "
                  "factors fitted on a Lie group (Li, 2024, arXiv:2402.11858)", default_lr=1e-3)
registry.register("xgrad", xgrad, "XGrad around sgd|adam|adamw (base=NAME): the gradient at weights predicted "
                  "horizon steps ahead by the base's update rule (Guan et al., 2023, arXiv:2305.18240)",
                  default_lr=None, wraps=True)

# Keyword arguments of torch.optim classes that are not hyperparameters of the update rule.
_NOT_HYPER = {"self", "params", "differentiable", "capturable"}


def hyperparameters(name: str, base: str | None = None) -> dict[str, Any]:
    """The hyperparameters of optimizer ``name`` with their defaults (``lr`` included).

    For a wrapper (``lookahead``) they are its own plus those of its ``base`` optimizer (default: the
    wrapper's default base), whose defaults, ``lr`` included, apply.
    """
    entry = registry.entry(name)
    fn = entry.obj.__init__ if isinstance(entry.obj, type) else entry.obj
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name in _NOT_HYPER or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[p.name] = None if p.default is inspect.Parameter.empty else p.default
    if entry.extra.get("wraps"):
        return {**hyperparameters(base if isinstance(base, str) else out["base"]), **out}
    out["lr"] = entry.extra.get("default_lr", out.get("lr"))
    return out


def check(name: str, hp: Mapping[str, Any]) -> None:
    """Raise a :class:`ConfigError` naming the first bad hyperparameter of optimizer ``name`` (unknown, of the
    wrong type, or refused by the optimizer's own checks), before any model exists: ``hp`` is type-checked
    and the optimizer built once over a stand-in parameter."""
    create(name, [torch.zeros(2, 2, requires_grad=True)], **hp)


class HyperparameterTypeError(ConfigError, TypeError):
    """A hyperparameter of the wrong type (``momentum=True``, ``betas=0.9``, ``eps="abc"``)."""


def check_hyperparameters(name: str, hp: Mapping[str, Any]) -> None:
    """Raise :class:`HyperparameterTypeError` unless every value in ``hp`` has the type optimizer ``name``
    declares for it (its annotation, else its default's type): a float takes an int or a float (not a bool
    or a string), a bool only a bool, a tuple a list or tuple of that length, a ``None`` default anything."""
    types_ = _hyperparameter_types(name, hp.get("base"))
    for key, value in hp.items():
        tp = types_.get(key, Any)
        if not _accepts(tp, value):
            raise HyperparameterTypeError(f"hyperparameter {key} of optimizer {name!r} must be {_describe(tp)}, "
                                          f"got {value!r:.60}")


def _hyperparameter_types(name: str, base: str | None = None) -> dict[str, Any]:
    entry = registry.entry(name)
    fn = entry.obj.__init__ if isinstance(entry.obj, type) else entry.obj
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations that do not evaluate here: fall back to the defaults
        hints = {}
    out: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name in _NOT_HYPER or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        d = p.default
        out[p.name] = hints.get(p.name, Any if d is None or d is inspect.Parameter.empty else (
            tuple[(float,) * len(d)] if isinstance(d, tuple) else type(d)))
    if entry.extra.get("wraps"):  # a base that is not a name is refused by the wrapper's own type (str)
        return {**_hyperparameter_types(base if isinstance(base, str) else hyperparameters(name)["base"]), **out}
    return out


def _accepts(tp: Any, v: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, v) for a in args)
    if tp is Any:
        return True
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    if origin is tuple or tp is tuple:
        if not isinstance(v, (list, tuple)):
            return False
        if args and args[-1] is not Ellipsis:
            return len(v) == len(args) and all(_accepts(a, x) for a, x in zip(args, v, strict=True))
        return all(_accepts(args[0], x) for x in v) if args else True
    if isinstance(tp, type):
        return isinstance(v, tp)
    return True


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not torch.Tensor]
        return " or ".join(dict.fromkeys(parts))
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} numbers" if all(_describe(a) == "a number" for a in args) else \
            f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", type(None): "none"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def create(name: str, params: Iterable[Any], **hp: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``params`` with hyperparameters ``hp``.

    >>> model = torch.nn.Linear(4, 2)
    >>> opt = create("sgd", model.parameters(), lr=0.1, momentum=0.9)
    """
    cls = registry.get(name)
    check_hyperparameters(name, {k: v for k, v in hp.items() if k != "lr"})
    valid = hyperparameters(name, hp.get("base"))
    unknown = sorted(set(hp) - set(valid))
    if unknown:
        raise TypeError(f"optimizer {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(sorted(valid))}")
    kwargs = {"lr": valid["lr"], **hp}
    lr = kwargs["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ConfigError(f"lr={lr!r} is out of range for optimizer {name!r}; allowed: lr >= 0")
    if name in _FUSED_BY_DEFAULT and kwargs.get("fused") is None and kwargs.get("foreach") is None and \
            not kwargs.get("differentiable") and not kwargs.get("capturable"):
        params = [dict(item, params=list(item["params"])) if isinstance(item, dict) else item for item in params]
        if _fusable(params):  # torch's fused kernel: one pass per step (5x its for-loop at 10M params on CPU)
            kwargs["fused"] = True
    try:
        return cls(params, **kwargs)
    except (ValueError, TypeError) as e:  # torch's own checks, e.g. "Invalid momentum value: -1", "'<=' not supported"
        raise ConfigError(f"optimizer {name!r}: {e}") from None


#: torch.optim optimizers that ``create`` builds with ``fused=True`` when the caller leaves ``fused`` and
#: ``foreach`` unset and every parameter is a floating-point tensor on the CPU or CUDA (BENCHMARKS.md).
_FUSED_BY_DEFAULT = ("adam", "adamw")


def _fusable(params: list[Any]) -> bool:
    tensors = [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return False  # e.g. (name, parameter) pairs: left to torch's default
    return all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors) and \
        len({t.device.type for t in tensors}) == 1


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in tensors of the optimizer's per-parameter state (moments, buffers, ...)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total
