"""``mda``: minimum-diameter averaging, the mean of the n − f vectors of smallest diameter.

El Mhamdi, Guerraoui, Guirguis, Hoang, Rouault, "Genuinely Distributed Byzantine Machine Learning",
PODC 2020 (arXiv:1905.03853). With ‖·‖ the Euclidean norm,

    S* ∈ argmin_{S ⊂ [n], |S| = n − f} max_{i, j ∈ S} ‖x_i − x_j‖,    MDA_f = (1/(n − f)) Σ_{i ∈ S*} x_i,

defined for n > 2f. The C(n, f) subsets are enumerated (in lexicographic order; ties go to the first),
in blocks whose diameters are computed at once from the pairwise distances; more than 10^6 subsets is
refused. A non-finite vector is infinitely far from every other, so any subset holding one has an
infinite diameter and, with at most f of them, is never chosen. ByzFL's ``MDA(f)`` is the same rule
(one Python loop over the subsets).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, check_range
from ._robust import check_f, distances, finite_rows, stack
from .base import Aggregator

MAX_SUBSETS = 10**6
_BLOCK = 1 << 22  # distance entries gathered at once


@dataclass
class MDAOptions:
    f: int = 1  # Byzantine vectors tolerated: the subset has n - f vectors

    def validate(self) -> None:
        check_range("mda f", self.f, low=0, integer=True)


class MDA(Aggregator):
    name = "mda"
    description = "minimum-diameter averaging (El Mhamdi et al., 2020): mean of the n-f vectors of least diameter"
    Options = MDAOptions

    def check_workers(self, n: int) -> None:
        f = self.options.f
        check_f(f"aggregator {self.name}", f, n, n > 2 * f, "n > 2f")
        if math.comb(n, f) > MAX_SUBSETS:
            raise ConfigError(f"aggregator mda: f={f} with n={n} vectors means C(n, f)={math.comb(n, f)} subsets "
                              f"to compare; allowed: at most {MAX_SUBSETS}")

    def __call__(self, vectors) -> torch.Tensor:
        x = stack(vectors)
        n, f = x.shape[0], self.options.f
        self.check_workers(n)
        d = distances(x, finite_rows(x))
        k = n - f
        per_block = max(1, _BLOCK // (k * k))
        combos = itertools.combinations(range(n), k)
        best, best_set = None, None
        while block := list(itertools.islice(combos, per_block)):
            s = torch.tensor(block, device=x.device)
            diam = d[s.unsqueeze(2), s.unsqueeze(1)].flatten(1).amax(dim=1)
            i = int(torch.argmin(diam))  # the first minimum
            if best is None or float(diam[i]) < best:
                best, best_set = float(diam[i]), s[i]
        return x[best_set].mean(dim=0)
