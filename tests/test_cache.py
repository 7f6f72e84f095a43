"""The per-example fixed-point cache: storage, eviction, dtypes, memory-mapped files, the DEQ's
warm start from it, and training with it (fewer forward NFE once examples recur)."""

import csv
from pathlib import Path

import pytest
import torch

import deepeq
from deepeq.nn import FixedPointCache
from deepeq.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]


def test_store_lookup_and_lru_eviction(tmp_path):
    c = FixedPointCache(3 * 4 * 4, dtype="float32")  # room for 3 states of 4 floats
    z = torch.arange(12.0).view(3, 4)
    c.update(torch.tensor([10, 11, 12]), z)
    assert c.capacity == 3 and len(c) == 3
    out, hit = c.lookup(torch.tensor([12, 99]), torch.zeros(2, 4))
    assert (
        hit.tolist() == [True, False]
        and torch.equal(out[0], z[2])
        and torch.equal(out[1], torch.zeros(4))
    )
    c.update(torch.tensor([13]), torch.ones(1, 4))  # evicts the least recently used: 10
    assert c.evictions == 1 and 10 not in c.slots and {11, 12, 13} <= set(c.slots)
    c.update(torch.tensor([11]), torch.full((1, 4), 7.0))  # overwrite in place
    assert torch.equal(c.lookup(torch.tensor([11]), torch.zeros(1, 4))[0], torch.full((1, 4), 7.0))
    h = FixedPointCache(1 << 10, dtype="float16")
    h.update(torch.tensor([0]), torch.tensor([[1.0 / 3]]))
    v = h.lookup(torch.tensor([0]), torch.zeros(1, 1))[0]
    assert (
        v.dtype == torch.float32 and abs(float(v) - 1 / 3) < 1e-3 and h.store.dtype == torch.float16
    )
    m = FixedPointCache(1 << 12, path=tmp_path / "cache.npy")
    m.update(torch.tensor([5, 6]), z[:2])
    assert (tmp_path / "cache.npy").exists() and torch.equal(
        m.lookup(torch.tensor([6]), torch.zeros(1, 4))[0], z[1:2]
    )


def test_cache_errors():
    with pytest.raises(ValueError, match="max_bytes must be an int > 0"):
        FixedPointCache(0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        FixedPointCache(100, dtype="bfloat16")
    with pytest.raises(ValueError, match="cannot hold one equilibrium of 100 values"):
        FixedPointCache(16).update(torch.tensor([0]), torch.zeros(1, 100))
    c = FixedPointCache(2 * 4 * 4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        c.update(torch.tensor([0, 1, 2]), torch.zeros(3, 4))
    c.update(torch.tensor([0]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="holds states of 4 values; this solve's have 5"):
        c.lookup(torch.tensor([0]), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="distinct"):
        c.lookup(torch.tensor([1, 1]), torch.zeros(2, 4))


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, z, x):
        return torch.tanh(0.7 * self.lin(z) + x)


def test_deq_starts_cached_examples_at_their_equilibrium():
    deq = deepeq.DEQ(Layer(), solver=deepeq.Anderson(rtol=1e-4, max_steps=50),
                     cache=FixedPointCache(1 << 16))  # fmt: skip
    x = torch.randn(6, 8)
    keys = torch.arange(6)
    z1, s1 = deq(x, cache_keys=keys)
    z2, s2 = deq(x, cache_keys=keys)  # every example starts at its stored z*
    assert s2.stats.nfe < s1.stats.nfe and int(s2.stats.num_steps.max()) <= 1
    torch.testing.assert_close(z2, z1, rtol=1e-3, atol=1e-4)
    z2.sum().backward()  # gradients as usual
    deq.eval()
    _, s3 = deq(x, cache_keys=keys)  # evaluation ignores the cache
    assert s3.stats.nfe == s1.stats.nfe


def test_training_with_the_cache_needs_fewer_forward_nfe_once_examples_recur(tmp_path):
    # copy memory: 32 examples, batch 8 -> 4 steps per epoch; every example recurs in epoch 2
    args = ["--steps=8", "--data.seq_len=10", "--data.n_train=32", "--data.n_test=16", "--batch_size=8",
            "--eval_every=8", "--ckpt_every=8", "--optim.lr=1e-4", "--model.overrides.solve.f_rtol=3e-2",
            "--model.overrides.solve.f_max_steps=40"]  # fmt: skip
    runs = {}
    for on in (False, True):
        out = tmp_path / str(on)
        cfg = load_config(ROOT / "configs/copy_memory_tiny.toml",
                          [*args, f"--fp_cache={str(on).lower()}", f"--out_dir={out}"])  # fmt: skip
        train(cfg, progress=False)
        with (out / "metrics.csv").open() as fh:
            runs[on] = list(csv.DictReader(fh))
    off, on = runs[False], runs[True]
    assert all(r["cache_hits"] == "" for r in off)
    assert [float(r["cache_hits"]) for r in on] == [0.0] * 4 + [1.0] * 4
    nfe = lambda rows: sum(int(r["fwd_nfe"]) for r in rows[4:])  # noqa: E731
    assert nfe(on) < nfe(off)
    with pytest.raises(ValueError, match="fp_cache = true needs an equilibrium model"):
        train(load_config(ROOT / "configs/copy_memory_tiny.toml",
                          [*args[:-2], "--fp_cache=true", "--model.name=lstm_tiny", f"--out_dir={tmp_path / 'x'}"]))  # fmt: skip
