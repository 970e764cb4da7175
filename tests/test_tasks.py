import pytest
import torch

from sgdlab import tasks
from sgdlab.errors import ConfigError, DataError
from sgdlab.tasks.text import stdlib_files

from .conftest import TINY_LM


@pytest.mark.parametrize("name,opts", [("charlm", TINY_LM), ("digits", {}), ("digits", {"model": "cnn"}),
                                       ("quadratic", {}), ("logreg", {}), ("rosenbrock", {})])
def test_task_trains_and_evaluates(name, opts):
    t = tasks.create(name, opts)
    torch.manual_seed(0)
    m = t.build_model()
    idx = None if t.num_train is None else torch.arange(4)
    loss = t.loss(m, t.get_batch(idx))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    ev = t.evaluate(m)
    assert "val_loss" in ev and t.metric in ev


def test_model_init_is_deterministic():
    t = tasks.create("charlm", TINY_LM)
    torch.manual_seed(3)
    a = t.build_model().state_dict()
    torch.manual_seed(3)
    b = t.build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_charlm_corpus_is_sorted_stdlib_without_tests():
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert not any(part in ("site-packages", "test", "tests") for r in rel for part in r.split("/")[:-1])
    t1, t2 = tasks.create("charlm", TINY_LM), tasks.create("charlm", TINY_LM)
    assert t1.sha256 == t2.sha256 and len(t1.train) + len(t1.val) == TINY_LM["max_bytes"]


def test_text_batch_is_next_byte_shift():
    t = tasks.create("charlm", TINY_LM)
    x, y = t.get_batch(torch.tensor([0, 100]))
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[0], t.train[:32].long())


def test_textfile(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world, " * 400)
    t = tasks.create("textfile", {"context": 16}, data=str(p))
    assert t.num_train == len(t.train) - 16
    with pytest.raises(DataError, match="no such file"):
        tasks.create("textfile", {}, data=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="needs --data"):
        tasks.create("textfile", {})
    small = tmp_path / "s.txt"
    small.write_text("tiny")
    with pytest.raises(DataError, match="too small"):
        tasks.create("textfile", {"context": 16}, data=str(small))
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(DataError):
        tasks.create("textfile", {}, data=str(d))


def test_sampler_epochs_without_replacement_and_resumable():
    s = tasks.EpochSampler(torch.arange(10), 3, seed=1)
    epoch0 = torch.cat([s.next() for _ in range(3)])
    assert sorted(epoch0.tolist()) == sorted(set(epoch0.tolist())) and len(epoch0) == 9
    first_of_e1 = s.next()
    assert s.epoch == 1
    st = s.state_dict()
    rest = [s.next() for _ in range(5)]
    s2 = tasks.EpochSampler(torch.arange(10), 3, seed=1)
    s2.load_state_dict(st)
    assert all(torch.equal(a, s2.next()) for a in rest)
    assert not torch.equal(first_of_e1, epoch0[:3])  # reshuffled per epoch
    with pytest.raises(ConfigError, match="batch_size=11 is larger than the data"):
        tasks.EpochSampler(torch.arange(10), 11, seed=0)


def test_shards_iid_and_contiguous_partition():
    for split in ("iid", "contiguous"):
        shards = tasks.shard_indices(103, 4, split, seed=0)
        allidx = torch.cat(shards)
        assert sorted(allidx.tolist()) == list(range(103))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    c = tasks.shard_indices(10, 2, "contiguous", 0)
    assert c[0].tolist() == [0, 1, 2, 3, 4]


def test_shards_dirichlet_label_skew():
    t = tasks.create("digits")
    skew = t.shards(4, "dirichlet:0.1", seed=0, min_size=8)
    assert sorted(torch.cat(skew).tolist()) == list(range(t.num_train))
    # with a small concentration most workers are dominated by few classes
    top_share = [torch.bincount(t.labels[s], minlength=10).max().item() / len(s) for s in skew]
    iid_share = [torch.bincount(t.labels[s], minlength=10).max().item() / len(s)
                 for s in t.shards(4, "iid", seed=0)]
    assert sum(top_share) / 4 > 2 * sum(iid_share) / 4
    with pytest.raises(ConfigError, match="labelled task"):
        tasks.create("quadratic").shards(2, "dirichlet:1", 0)
    with pytest.raises(ConfigError, match="allowed: iid, contiguous, dirichlet:ALPHA"):
        tasks.parse_split("random")
    with pytest.raises(ConfigError, match="positive concentration"):
        tasks.parse_split("dirichlet:-1")


def test_known_optima():
    q = tasks.create("quadratic", {"condition": 1000.0})
    assert float(q.objective64(q.w_opt)) < 1e-20
    eig = torch.linalg.eigvalsh(q.x64.t() @ q.x64 / len(q.x64))
    assert 300 < float(eig.max() / eig.min()) < 3000  # ill-conditioned as asked
    lr = tasks.create("logreg")
    w = lr.w_opt.clone().requires_grad_()
    lr.objective64(w).backward()
    assert w.grad.norm() < 1e-10  # stationary point of a strictly convex objective
    r = tasks.create("rosenbrock")
    m = r.build_model()
    with torch.no_grad():
        m.xy.copy_(torch.tensor([1.0, 1.0]))
    assert r.evaluate(m)["optimality_gap"] == 0.0
