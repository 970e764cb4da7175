"""SWAD (Cha et al., 2021): the loss-valley start/end on a hand-traced synthetic loss sequence, dense averaging
against the uniform mean of the iterates, identical weights, and a mid-valley state_dict round trip."""

import io

import pytest
import torch

from sgdlab import optim
from sgdlab.errors import ConfigError
from sgdlab.optim.swad import LossValley, Segment

DT = torch.float64
# decreasing, a flat valley, then increasing; segment k (1-based) has weight k and covers step k
LOSSES = [5, 4, 3, 2, 1.0, 1.1, 1.05, 1.2, 1.1, 1.3, 1.25, 2.0, 3, 4, 5, 6, 7, 8]


def push(valley, k):
    valley.push(Segment([torch.tensor([float(k)], dtype=DT)], n=1, start=k, end=k, loss=LOSSES[k - 1]))


def test_the_valley_starts_at_the_converged_minimum_and_dies_when_the_smoothed_loss_passes_the_threshold():
    """Hand-traced (N_s = 3, N_e = 6, r = 0.3): converged when segment 7 arrives (the oldest of 5, 6, 7 is the
    minimum), threshold = mean(1.0, 1.1, 1.05) * 1.3 = 1.365; segments 5..11 join one by one as segment k + 5
    arrives; the valley dies at 17, when min(losses of 12..17) = 2 > 1.365. Final: mean(5..11) = 8."""
    v = LossValley(3, 6, 0.3)
    for k in range(1, 7):
        push(v, k)
        assert v.converge_step is None and v.final_average() is None
    push(v, 7)
    assert v.converge_step == 5 and v.threshold == pytest.approx(1.365)
    for k in range(8, 13):
        push(v, k)
    assert (v.final.n, v.final.start, v.final.end) == (3, 5, 7)  # 5, 6, 7 joined at 10, 11, 12
    flushed = v.final_average()  # what the end would give now: 8..11 join (min of 8..12 <= 1.365), 12 not
    assert (flushed.n, flushed.start, flushed.end) == (7, 5, 11) and flushed.weights[0].item() == pytest.approx(8.0)
    assert v.final.n == 3 and len(v.smooth_q) == 6  # nothing consumed
    for k in range(13, 17):
        push(v, k)
        assert not v.dead
    push(v, 17)
    assert v.dead
    final = v.final_average()
    assert (final.n, final.start, final.end) == (7, 5, 11) and final.weights[0].item() == pytest.approx(8.0)
    push(v, 18)  # a dead valley ignores later segments
    assert v.final_average().end == 11


def train(opt, w, steps, every, losses=None):
    iterates = []
    for t in range(1, steps + 1):
        w.grad = torch.cos(torch.arange(w.numel(), dtype=DT) + t)  # any gradients: the iterates are recorded
        opt.step()
        iterates.append(w.detach().clone())
        if t % every == 0:
            opt.after_evaluate({"val_loss": 1.0 if losses is None else losses[t // every - 1]})
    return iterates


def test_dense_averaging_over_the_whole_run_is_the_uniform_mean_of_the_iterates():
    """N_s = N_e = 1 and a huge tolerance keep every segment: the final average is the uniform mean of every
    iterate after the first segment (as in the reference, the converge segment seeds the average with a count
    of 0, so the first segment added replaces it)."""
    w = torch.zeros(5, dtype=DT, requires_grad=True)
    opt = optim.create("swad", [w], lr=0.1, momentum=0.5, n_converge=1, n_tolerance=1, tolerance_ratio=1e9)
    iterates = train(opt, w, 12, 3)
    avg = opt.averaged_parameters()[w]
    torch.testing.assert_close(avg, torch.stack(iterates[3:]).mean(0), rtol=1e-12, atol=1e-14)
    assert opt.window == (4, 12)


def test_identical_weights_average_to_themselves_and_nothing_before_convergence():
    w = torch.randn(4, dtype=DT, requires_grad=True)
    opt = optim.create("swad", [w], lr=0.0)
    train(opt, w, 4, 2)
    assert opt.averaged_parameters() is None  # two evaluations: N_s = 3 not yet full
    train(opt, w, 20, 2)
    assert torch.equal(opt.averaged_parameters()[w], w.detach())


def test_state_dict_mid_valley_continues_identically():
    losses = [3.0, 2.0, 1.0, 1.1, 1.2, 1.05, 1.3, 2.5, 3.0, 4.0]
    a = torch.zeros(3, dtype=DT, requires_grad=True)
    b = torch.zeros(3, dtype=DT, requires_grad=True)
    opt_a = optim.create("swad", [a], lr=0.1, n_converge=2, n_tolerance=3)
    train(opt_a, a, 13, 2, losses)  # converged, one step into a segment
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    opt_b = optim.create("swad", [b], lr=0.1)
    b.data.copy_(a.data)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    for opt, w in ((opt_a, a), (opt_b, b)):
        for t in range(14, 21):
            w.grad = torch.cos(torch.arange(3, dtype=DT) + t)
            opt.step()
            if t % 2 == 0:
                opt.after_evaluate({"val_loss": losses[t // 2 - 1]})
    assert torch.equal(a, b) and opt_b.valley.dead == opt_a.valley.dead
    assert torch.equal(opt_a.averaged_parameters()[a], opt_b.averaged_parameters()[b])
    assert opt_a.window == opt_b.window


@pytest.mark.parametrize("kw, pattern", [({"n_converge": 0}, "n_converge=0"), ({"n_tolerance": 0}, "n_tolerance=0"),
                                         ({"tolerance_ratio": -0.1}, r"tolerance_ratio=-0\.1"),
                                         ({"n_converge": 2.5}, "n_converge")])
def test_bad_hyperparameters_are_config_errors_naming_them(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        optim.create("swad", [torch.zeros(2, requires_grad=True)], **kw)
