"""Multiscale DEQ and image data: registry-wide gradients, fusion shapes, loaders on generated
files in the official formats, real MNIST counts, augmentation, a tiny MNIST run, NFE sweep."""

import dataclasses
import gzip
import itertools
import pickle
import struct
from pathlib import Path

import pytest
import torch

from deepeq.analysis.studies import eval_sweep, sweep
from deepeq.data import images as im
from deepeq.models import create_model, list_models
from deepeq.models.mdeq import Fusion, MDEQConfig
from deepeq.train import load_config, load_run, train

ROOT = Path(__file__).resolve().parents[1]
# Registry-wide, at CPU-test sizes: paper models keep their structure (4 resolutions, channels
# ratios, stem downsampling) with the image size reduced.
SMALL_IMAGES = {"mdeq_imagenet": dict(image_size=32), "mdeq_cifar": {}}


@pytest.mark.parametrize("name", list_models("mdeq*"))
def test_every_mdeq_trains_one_step(name):
    torch.manual_seed(0)
    model = create_model(
        name, solve=dict(f_max_steps=3, b_max_steps=3), **SMALL_IMAGES.get(name, {})
    )
    c = model.config
    x = torch.randn(2, c.in_channels, c.image_size, c.image_size)
    logits, state, sols = model(x)
    assert logits.shape == (2, c.num_classes) and state is None
    assert torch.isfinite(logits).all()
    if c.core == "deq":
        assert len(sols) == 1 and isinstance(sols[0].value, tuple)
        assert [tuple(v.shape) for v in sols[0].value] == model.state_shapes(2)
    else:
        assert sols == []
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _mnist_batch(model, n: int, offset: int = 0):
    """n real MNIST training images in the model's input format (zero-padded to its size, the
    grey channel repeated for colour models), scaled to [0, 1], and their labels."""
    d = im.mnist()
    c = model.config
    x = d.train_x[offset : offset + n].float() / 255.0
    pad = c.image_size - x.shape[-1]
    x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return x.expand(n, c.in_channels, c.image_size, c.image_size).contiguous(), d.train_y[
        offset : offset + n
    ].long()


@pytest.mark.parametrize("name", list_models("mdeq*"))
def test_every_resolution_of_every_mdeq_is_alive_on_real_mnist(name):
    """After a few Adam steps on real MNIST every parameter has a non-zero gradient, every
    resolution's equilibrium is non-zero, and zeroing any one resolution changes the logits (the
    lower resolutions used to stay at z = 0 with exactly zero gradients: 60-92% of each model)."""
    torch.manual_seed(0)
    model = create_model(name, **SMALL_IMAGES.get(name, {}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(3):
        x, y = _mnist_batch(model, 8, offset=8 * step)
        loss = model(x, targets=y)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.any())]
    assert not dead, f"parameters with an all-zero gradient: {dead}"
    if model.config.core != "deq":
        return
    model.eval()
    x, _ = _mnist_batch(model, 4, offset=100)
    with torch.no_grad():
        inj = model.inject(x)
        z, _ = model.solve_equilibrium(
            inj, tuple(inj[0].new_zeros(s) for s in model.state_shapes(4))
        )
        logits = model.classify(z)
        for i, zi in enumerate(z):
            assert bool((zi.flatten(1).norm(dim=1) > 1e-3 * zi[0].numel() ** 0.5).all()), i
            dropped = model.classify(
                tuple(torch.zeros_like(v) if j == i else v for j, v in enumerate(z))
            )
            assert (dropped - logits).abs().max() > 1e-3, (
                f"resolution {i} does not reach the logits"
            )


@pytest.mark.parametrize("name", ["mdeq_tiny", "mdeq_small", "mdeq_cifar"])
def test_fresh_mdeq_solves_converge(name):
    """A well-conditioned start: Broyden reaches rtol 1e-3 at initialisation (the lower
    resolutions, which used to be dead, are part of the solve)."""
    import deepeq

    torch.manual_seed(0)
    model = create_model(name).eval()
    x, _ = _mnist_batch(model, 8)
    with torch.no_grad():
        inj = model.inject(x)
        z0 = tuple(inj[0].new_zeros(s) for s in model.state_shapes(8))
        sol = deepeq.fixed_point(model.f, z0, deepeq.Broyden(rtol=1e-3, max_steps=30), args=(inj,))
    assert sol.status.name == "CONVERGED", sol.stats.rel_residual
    assert all(bool(v.abs().amax() > 0.1) for v in sol.value)


def test_fusion_shapes_at_every_resolution():
    chans = (4, 8, 12, 16)
    fuse = Fusion(chans, groups=4, scale=1.0)
    hs = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(chans)]
    out = fuse(hs)
    assert [tuple(o.shape) for o in out] == [tuple(h.shape) for h in hs]
    # every resolution receives every other: perturbing one input moves all outputs
    hs2 = [h.clone() for h in hs]
    hs2[3] = hs2[3] + torch.randn_like(hs2[3])
    moved = [(a - b).abs().max().item() > 1e-4 for a, b in zip(fuse(hs2), out, strict=True)]
    assert all(moved)


def test_mdeq_config_errors():
    with pytest.raises(ValueError, match="cannot be halved exactly 3 times"):
        MDEQConfig(image_size=28, channels=(4, 8, 16, 32), head_channels=(4, 8, 16, 32)).validate()
    with pytest.raises(ValueError, match="divisible by num_groups"):
        MDEQConfig(channels=(6, 8), head_channels=(8, 8)).validate()  # state channels
    model = create_model("mdeq_tiny")
    with pytest.raises(ValueError, match=r"images must be \(B, 1, 28, 28\); got \(2, 3, 28, 28\)"):
        model(torch.zeros(2, 3, 28, 28))


# --- data -------------------------------------------------------------------------------------
def test_mnist_counts_and_label_histogram():
    d = im.mnist()
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert d.train_x.dtype == torch.uint8 and d.num_classes == 10
    assert d.train_y.bincount().tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert d.test_y.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _write_idx(path: Path, t: torch.Tensor, gz: bool) -> None:
    code = {torch.uint8: 0x08, torch.int32: 0x0C}[t.dtype]
    head = bytes([0, 0, code, t.dim()]) + struct.pack(f">{t.dim()}I", *t.shape)
    body = t.numpy().astype(">i4").tobytes() if t.dtype == torch.int32 else t.numpy().tobytes()
    raw = head + body
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_idx_reader_and_dataset_on_generated_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    xtr = torch.randint(0, 256, (6, 5, 4), generator=g, dtype=torch.uint8)
    ytr = torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.uint8)
    xte, yte = xtr[:2].clone(), ytr[:2].clone()
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", xtr, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", ytr, gz=False)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", xte, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", yte, gz=True)
    d = im.load_images("idx", str(tmp_path))
    assert torch.equal(d.train_x[:, 0], xtr) and d.train_y.tolist() == ytr.tolist()
    assert d.num_classes == 3
    big = torch.tensor([[1, -2], [300000, 4]], dtype=torch.int32)  # big-endian multi-byte
    _write_idx(tmp_path / "i32", big, gz=False)
    assert torch.equal(im.read_idx(tmp_path / "i32"), big)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01")
    with pytest.raises(ValueError, match="not an idx file"):
        im.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match=r"header says \(10,\)"):
        im.read_idx(tmp_path / "short")
    with pytest.raises(
        FileNotFoundError, match=r"missing idx file\(s\) \['train-images-idx3-ubyte'"
    ):
        im.idx_dataset(tmp_path / "nothing")


def _write_cifar(root: Path, n: int = 4) -> None:
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy()
        labels = torch.randint(0, 10, (n,), generator=g).tolist()
        with (root / name).open("wb") as fh:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, fh)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    with (root / "batches.meta").open("wb") as fh:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, fh)


def test_cifar10_loader_on_official_pickles(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    d = im.load_images("cifar10", str(tmp_path))  # the parent directory is accepted too
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    assert d.classes[0] == "airplane" and d.num_classes == 10
    with (tmp_path / "cifar-10-batches-py" / "data_batch_1").open("rb") as fh:
        raw = pickle.load(fh)
    # row-major (3, 32, 32): the first 1024 bytes are the red plane
    assert torch.equal(d.train_x[0, 0].flatten(), torch.as_tensor(raw[b"data"][0][:1024]))
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        im.cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing \['data_batch_1'"):
        im.cifar10(tmp_path / "elsewhere")


def test_image_folder_loader_on_png_files(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 1)):
        for ci, cls in enumerate(("cat", "dog")):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for k in range(n):
                arr = torch.full((10, 12, 3), 40 * ci + k, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"{k}.png")
    d = im.load_images("imagefolder", str(tmp_path), image_size=8)
    assert d.train_x.shape == (6, 3, 8, 8) and d.test_x.shape == (2, 3, 8, 8)
    assert d.classes == ("cat", "dog") and d.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(d.train_x[4, 0, 3, 3]) == 41
    with pytest.raises(FileNotFoundError, match=r"expected .*/train/<class>/<image>"):
        im.image_folder(tmp_path / "train")


def test_augmentation_crops_and_flips_deterministically():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    a = im.augment(x, torch.Generator().manual_seed(3), pad=2, flip=True)
    b = im.augment(x, torch.Generator().manual_seed(3), pad=2, flip=True)
    assert torch.equal(a, b) and a.shape == x.shape
    # every output is a (possibly flipped) window of the zero-padded image
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):
        windows = [padded[n, :, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(a[n], w) or torch.equal(a[n], w.flip(-1)) for w in windows)
    assert im.pad_to(torch.zeros(1, 1, 28, 28), 32).shape == (1, 1, 32, 32)


# --- training ---------------------------------------------------------------------------------
def test_tiny_mnist_run_beats_chance_and_sweeps_nfe(tmp_path):
    cfg = load_config(
        ROOT / "configs/mnist_mdeq.toml",
        [
            "--steps=60", "--batch_size=32", "--eval_every=60", "--data.limit_train=1920",
            "--data.limit_test=300", "--optim.warmup_steps=5", "--optim.lr=1e-2",
            f"--out_dir={tmp_path}", "--jac.monitor_every=30",
        ],
    )  # fmt: skip
    m = train(cfg, progress=False)
    assert m["test_acc"] > 0.5, m  # chance is 0.1 (measured 0.69)
    assert m["images_per_s"] > 0 and m["spectral_radius"] > 0
    _, model, task = load_run(tmp_path)
    rows = eval_sweep(model, task, [1, 2, 4, 8])
    res = [float(r.split("|")[-2]) for r in rows[2:]]
    per_sample = [float(r.split("|")[-3]) for r in rows[2:]]
    nfe = [float(r.split("|")[-4]) for r in rows[2:]]
    assert nfe == [2.0, 3.0, 5.0, 9.0]  # cap + the tracked call at the equilibrium
    assert all(1 <= s <= n for s, n in zip(per_sample, nfe, strict=True)), (per_sample, nfe)
    assert all(b <= a for a, b in itertools.pairwise(res)), res  # lowest-residual iterate
    # None = the configured eval solver, even after a capped row; the sweep restores it
    configured = model.config.solve
    first, last = sweep(model, task, [1, None], splits=("test",))
    assert model.config.solve is configured
    assert first["mean_nfe"] == 2.0 and last["mean_nfe"] > 2.0, (first, last)
    # The DEQ's solution is a fixed point of the explicit twin's layer (same weights): one more
    # layer of the twin on z* changes neither the state nor the logits.
    model = model.double().eval()
    model = model.with_solve(
        dataclasses.replace(
            model.config.solve, solver="anderson", eval_rtol=1e-8, eval_max_steps=300
        )
    )
    twin = create_model("mdeq_tied_tiny").double().eval()
    twin.load_state_dict(model.state_dict())
    x = task.prepare(task.xte[:4]).double()
    with torch.no_grad():
        a, _, sols = model(x)
        z_star = sols[0].value
        z_next = twin.f(z_star, twin.inject(x))
        b = twin.classify(z_next)
    assert sols[0].stats.rel_residual.max() < 1e-7
    for u, v in zip(z_next, z_star, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_image_configs_parse_and_build():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(path)
        if cfg.data.task != "image":
            continue
        with torch.device("meta"):
            model = create_model(cfg.model.name, **cfg.model.overrides)
        assert sum(p.numel() for p in model.parameters()) > 0, path.name
