"""Loaders (bundled sets and files in a folder) and partitioners, on real data."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import cifar_batch, idx_bytes, write_cifar, write_idx_set  # noqa: E402
from zmqgossip.data import (
    BALANCED_ROTATION,
    PAPER_LABEL_SHIFT,
    PAPER_ROTATION,
    DataError,
    Dataset,
    LabelPermutation,
    LabelShift,
    Rotation,
    allocate_clients,
    load_dataset,
    rotate,
)

# --------------------------------------------------------------------------- fixtures




@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", test_per_class=20, seed=0)


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_dataset("mnist-bundled", test_per_class=150, seed=0)


# ------------------------------------------------------------------- bundled loaders


def test_mnist_bundled_split_and_layout(mnist5k: Dataset) -> None:
    d = mnist5k
    assert d.x.shape == (3500, 1, 28, 28) and d.x.dtype == torch.float32
    assert d.y.shape == (3500,) and d.y.dtype == torch.int64
    assert d.test_x is not None and d.test_y is not None
    assert d.test_x.shape == (1500, 1, 28, 28)
    assert torch.bincount(d.test_y).tolist() == [150] * 10
    assert torch.bincount(d.y).tolist() == [350] * 10
    assert abs(float(d.x.mean())) < 0.1 and 0.8 < float(d.x.std()) < 1.2  # normalised
    assert not torch.equal(d.y[:500], torch.zeros(500, dtype=torch.int64))  # shuffled, not sorted
    assert torch.allclose(d.background, torch.tensor(-0.1307 / 0.3081).view(1, 1, 1))


def test_bundled_loaders_deterministic_by_seed(digits: Dataset) -> None:
    again = load_dataset("digits", test_per_class=20, seed=0)
    other = load_dataset("digits", test_per_class=20, seed=1)
    assert torch.equal(again.x, digits.x) and torch.equal(again.test_y, digits.test_y)
    assert not torch.equal(other.y, digits.y)
    assert digits.x.shape == (1797 - 200, 1, 8, 8)
    full = load_dataset("digits")
    assert full.test_x is None and full.x.shape == (1797, 1, 8, 8)


def test_unknown_name_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data set 'imagenet'.*digits.*mnist-bundled.*cifar10"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="root"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    with pytest.raises(DataError, match="test_per_class"):
        load_dataset("digits", test_per_class=0)
    with pytest.raises(DataError, match="class .* has only"):
        load_dataset("digits", test_per_class=500)


# ------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loader_plain_and_gz(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_set(tmp_path, 30, 20, gz)
    d = load_dataset("fashion-mnist", tmp_path)
    assert d.x.shape == (30, 1, 28, 28) and d.test_x is not None and d.test_x.shape == (20, 1, 28, 28)
    raw = arrays["train-images-idx3-ubyte"]
    expect = (raw[3, 5, 7] / 255.0 - 0.2860) / 0.3530
    assert float(d.x[3, 0, 5, 7]) == pytest.approx(expect, abs=1e-5)
    assert d.y.tolist() == (np.arange(30) % 10).tolist()
    sub = load_dataset("mnist", tmp_path, test_per_class=2)
    assert sub.test_y is not None and torch.bincount(sub.test_y).tolist() == [2] * 10


def test_idx_torchvision_layout(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "MNIST" / "raw", 10, 10, gz=True)
    assert load_dataset("mnist", tmp_path).x.shape == (10, 1, 28, 28)


def test_idx_truncated_bad_magic_missing(tmp_path: Path) -> None:
    write_idx_set(tmp_path, 10, 10, gz=False)
    f = tmp_path / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", tmp_path)
    f.write_bytes(b"\x00\x00\x09\x03" + b"\x00" * 20)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*bad IDX magic"):
        load_dataset("mnist", tmp_path)
    f.unlink()
    with pytest.raises(DataError, match="missing file t10k-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)


def test_idx_truncated_gzip_and_label_mismatch(tmp_path: Path) -> None:
    write_idx_set(tmp_path, 10, 10, gz=True)
    g = tmp_path / "train-images-idx3-ubyte.gz"
    g.write_bytes(g.read_bytes()[:-30])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path)
    write_idx_set(tmp_path, 10, 10, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(7))))
    with pytest.raises(DataError, match="7 labels for 10 images"):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_loader(tmp_path: Path, protocol: int) -> None:
    batches = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    d = load_dataset("cifar10", tmp_path)
    assert d.x.shape == (100, 3, 32, 32) and d.num_classes == 10
    assert d.test_x is not None and d.test_x.shape == (20, 3, 32, 32)
    raw = batches["data_batch_2"][b"data"]
    assert isinstance(raw, np.ndarray)
    # rows are R plane, G plane, B plane, each 32 x 32 row-major
    pix = raw[4, 1024 + 32 * 6 + 9] / 255.0
    assert float(d.x[20 + 4, 1, 6, 9]) == pytest.approx((pix - 0.4822) / 0.2435, abs=1e-5)
    # root may also be the batches folder itself
    same = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", test_per_class=1)
    assert torch.equal(same.x, d.x) and same.test_y is not None and len(same.test_y) == 10


class _Evil:
    def __init__(self, fn: object, arg: str) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("how", ["os.system", "builtins.eval"])
def test_cifar_malicious_pickle_refused(tmp_path: Path, how: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    marker = tmp_path / "pwned"
    if how == "os.system":
        evil = _Evil(os.system, f"touch {marker}")
    else:
        evil = _Evil(eval, f"open({str(marker)!r}, 'w').close()")
    payload = cifar_batch(20, 3)
    payload[b"data"] = evil
    (folder / "data_batch_3").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3.*refused global"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_bad_shapes_and_missing(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    bad = cifar_batch(20, 1)
    bad[b"data"] = np.zeros((20, 1000), dtype=np.uint8)
    (folder / "data_batch_1").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1.*\(N, 3072\)"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_1").write_bytes(pickle.dumps(cifar_batch(20, 1), protocol=2)[:500])
    with pytest.raises(DataError, match="data_batch_1.*(corrupt|truncated)"):
        load_dataset("cifar10", tmp_path)
    (folder / "test_batch").unlink()
    (folder / "data_batch_1").write_bytes(pickle.dumps(cifar_batch(20, 1), protocol=2))
    with pytest.raises(DataError, match="missing file test_batch"):
        load_dataset("cifar10", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="expected a folder cifar-10-batches-py"):
        load_dataset("cifar10", empty)


# ------------------------------------------------------------------------- allocation


def test_allocation_paper_sizes() -> None:
    assert allocate_clients([0.7, 0.2, 0.05, 0.05], 20) == [14, 4, 1, 1]
    assert allocate_clients([0.7, 0.2, 0.05, 0.05], 100) == [70, 20, 5, 5]
    assert allocate_clients([0.4, 0.6], 100) == [40, 60]
    assert allocate_clients([0.98, 0.01, 0.01], 10) == [8, 1, 1]  # each positive cluster >= 1
    assert allocate_clients([0.5, 0.5, 0.0], 3) == [2, 1, 0]
    with pytest.raises(DataError, match="3 clients cannot cover 4 clusters"):
        allocate_clients([0.7, 0.2, 0.05, 0.05], 3)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=6).filter(lambda v: sum(v) > 0),
    st.integers(1, 300),
)
def test_allocation_properties(raw: list[int], n: int) -> None:
    fr = [v / sum(raw) for v in raw]
    positive = sum(1 for f in fr if f > 0)
    if n < positive:
        with pytest.raises(DataError):
            allocate_clients(fr, n)
        return
    counts = allocate_clients(fr, n)
    assert sum(counts) == n
    assert all(c >= 1 for c, f in zip(counts, fr) if f > 0)
    assert all(c == 0 for c, f in zip(counts, fr) if f == 0)
    if all(f * n >= 1 for f in fr if f > 0):  # no forced bump: plain largest remainder
        assert all(abs(c - f * n) < 1 for c, f in zip(counts, fr))


# -------------------------------------------------------------------------- partitions


def _assert_disjoint(indices: list[torch.Tensor]) -> None:
    allidx = torch.cat(indices)
    assert len(torch.unique(allidx)) == len(allidx)


def test_label_shift_partition(digits: Dataset) -> None:
    p = PAPER_LABEL_SHIFT.split(digits, 10, 40, 10, seed=0)
    assert p.clusters == [0] * 4 + [1] * 6
    assert p.cluster_names == ["classes 0,1,8,9", "classes 2,3,4,5,6,7"]
    assert p.input_shape == (1, 8, 8) and p.num_classes == 10
    groups = [{0, 1, 8, 9}, {2, 3, 4, 5, 6, 7}]
    for c in range(2):
        members = [p.clients[i] for i in p.members(c)]
        _assert_disjoint([m.indices for m in members])
        for m in members:
            assert m.train_x.shape == (40, 1, 8, 8) and m.val_x.shape == (10, 1, 8, 8)
            assert set(m.train_y.tolist()) | set(m.val_y.tolist()) <= groups[c]
            assert torch.equal(m.train_x, digits.x[m.indices[:40]])
            assert torch.equal(m.val_y, digits.y[m.indices[40:]])
            assert m.test_x is members[0].test_x and m.test_y is members[0].test_y  # shared
        assert set(members[0].test_y.tolist()) == groups[c]
        assert len(members[0].test_y) == 20 * len(groups[c])


def test_rotation_partition_sizes_and_disjoint(digits: Dataset) -> None:
    p = PAPER_ROTATION.split(digits, 20, 40, 10, seed=0)
    assert [len(p.members(c)) for c in range(4)] == [14, 4, 1, 1]
    assert p.cluster_names == ["rot 0", "rot 180", "rot 10", "rot 350"]
    _assert_disjoint([c.indices for c in p.clients])  # one pool, no overlap
    for cl in p.clients:
        assert len(set(cl.train_y.tolist())) > 3  # IID labels
    c0 = p.clients[p.members(0)[0]]
    assert torch.equal(c0.train_x, digits.x[c0.indices[:40]])
    c180 = p.clients[p.members(1)[0]]
    assert torch.equal(c180.train_x, torch.rot90(digits.x[c180.indices[:40]], 2, dims=(-2, -1)))
    assert torch.equal(c180.test_x, torch.rot90(digits.test_x, 2, dims=(-2, -1)))  # type: ignore[arg-type]
    c10 = p.clients[p.members(2)[0]]
    orig = digits.x[c10.indices[:40]]
    assert not torch.allclose(c10.train_x, orig)
    assert torch.allclose(c10.train_x, rotate(orig, 10, digits.background))


def test_balanced_rotation_matches_rot90(digits: Dataset) -> None:
    p = BALANCED_ROTATION.split(digits, 8, 30, 10, seed=3)
    for c, k in enumerate([0, 1, 2, 3]):
        for i in p.members(c):
            cl = p.clients[i]
            assert torch.equal(cl.train_x, torch.rot90(digits.x[cl.indices[:30]], k, dims=(-2, -1)))
            assert torch.equal(cl.val_x, torch.rot90(digits.x[cl.indices[30:]], k, dims=(-2, -1)))


def test_rotate_resampling_direction_and_fill() -> None:
    x = torch.randn(3, 2, 9, 9)
    # The bilinear path agrees with torch.rot90 (counter-clockwise) just off a right angle.
    assert torch.allclose(rotate(x, 90.0 + 1e-7), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4)
    assert torch.allclose(rotate(x, -90.0 + 1e-7), torch.rot90(x, 3, dims=(-2, -1)), atol=1e-4)
    fill = torch.tensor([-1.0, 2.0]).view(2, 1, 1)
    r = rotate(torch.zeros(1, 2, 9, 9) + fill, 45, fill)
    assert torch.allclose(r, torch.zeros(1, 2, 9, 9) + fill, atol=1e-6)  # corners filled, not zero
    assert torch.equal(rotate(x, 360), x) and torch.equal(rotate(x, 450), torch.rot90(x, 1, dims=(-2, -1)))


def test_label_permutation_partition(digits: Dataset) -> None:
    p = LabelPermutation([0.5, 0.5], seed=1).split(digits, 6, 30, 10, seed=0)
    perms = LabelPermutation([0.5, 0.5], seed=1).permutations(10)
    assert torch.equal(perms[0], torch.arange(10)) and not torch.equal(perms[1], perms[0])
    _assert_disjoint([c.indices for c in p.clients])
    for cl in p.clients:
        assert torch.equal(cl.train_x, digits.x[cl.indices[:30]])
        assert torch.equal(cl.train_y, perms[cl.cluster][digits.y[cl.indices[:30]]])
        assert cl.test_x is digits.test_x
        assert torch.equal(cl.test_y, perms[cl.cluster][digits.test_y])  # type: ignore[index]


def test_partition_deterministic_by_seed(digits: Dataset) -> None:
    for shift in (PAPER_LABEL_SHIFT, PAPER_ROTATION):
        a = shift.split(digits, 10, 20, 5, seed=7)
        b = shift.split(digits, 10, 20, 5, seed=7)
        c = shift.split(digits, 10, 20, 5, seed=8)
        assert all(torch.equal(u.indices, v.indices) and torch.equal(u.train_x, v.train_x) for u, v in zip(a.clients, b.clients))
        assert any(not torch.equal(u.indices, v.indices) for u, v in zip(a.clients, c.clients))


def test_overflow_errors(digits: Dataset, mnist5k: Dataset) -> None:
    with pytest.raises(DataError, match=r"cluster 0 \(classes 0,1,8,9\).*40 clients x 500.*fits 2 clients"):
        PAPER_LABEL_SHIFT.split(mnist5k, 100, 400, 100, seed=0)
    with pytest.raises(DataError, match="allow_overlap"):
        PAPER_ROTATION.split(digits, 20, 70, 10, seed=0)  # 1600 > 1597
    p = Rotation([0, 180, 10, 350], [0.7, 0.2, 0.05, 0.05], allow_overlap=True).split(digits, 20, 70, 10, seed=0)
    for c in range(4):  # independent draws per cluster, still disjoint within one
        _assert_disjoint([p.clients[i].indices for i in p.members(c)])
    with pytest.raises(DataError, match="exceeds the pool"):
        Rotation([0, 90], [0.5, 0.5], allow_overlap=True).split(digits, 4, 700, 100, seed=0)


def test_random_groups() -> None:
    ls = LabelShift.random_groups(3, 3, 10, seed=5)
    flat = [c for g in ls.groups for c in g]
    assert len(flat) == len(set(flat)) == 9 and ls.fractions == pytest.approx((1 / 3,) * 3)
    assert LabelShift.random_groups(3, 3, 10, seed=5) == ls
    assert LabelShift.random_groups(3, 3, 10, seed=6) != ls
    over = LabelShift.random_groups(4, 5, 10, seed=0)  # must overlap, stays distinct
    assert len(set(over.groups)) == 4 and all(len(g) == 5 for g in over.groups)
    with pytest.raises(DataError, match="11 clusters from 10 classes"):
        LabelShift.random_groups(11, 1, 10)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LabelShift([[0, 1], [2]], [0.5, 0.6]), "sum to 1"),
        (lambda: LabelShift([[0, 1], [2]], [1.5, -0.5]), ">= 0"),
        (lambda: LabelShift([[0, -1], [2]], [0.5, 0.5]), "class ids"),
        (lambda: LabelShift([[0, 1]], [0.5, 0.5]), "1 groups but 2 fractions"),
        (lambda: LabelShift([[]], [1.0]), "empty"),
        (lambda: Rotation([0, "ninety"], [0.5, 0.5]), "angles must be finite numbers"),  # type: ignore[list-item]
        (lambda: Rotation([0, float("nan")], [0.5, 0.5]), "angles"),
        (lambda: Rotation([0, True], [0.5, 0.5]), "angles"),
        (lambda: Rotation([0, 90], [1.0]), "2 angles but 1 fractions"),
        (lambda: LabelPermutation([0.3, 0.3]), "sum to 1"),
    ],
)
def test_bad_settings(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match=match):
        make()


@pytest.mark.parametrize(
    "args, match",
    [((0, 10, 5), "n_clients must be >= 1"), ((4, 0, 5), "n_train"), ((4, 10, -1), "n_val"), ((4, 2.5, 5), "integer")],
)
def test_bad_split_sizes(digits: Dataset, args: tuple, match: str) -> None:
    with pytest.raises(DataError, match=match):
        PAPER_ROTATION.split(digits, *args, seed=0)


def test_split_needs_test_set_and_known_classes(digits: Dataset) -> None:
    with pytest.raises(DataError, match="no test split.*test_per_class"):
        PAPER_LABEL_SHIFT.split(load_dataset("digits"), 4, 10, 5, seed=0)
    with pytest.raises(DataError, match="outside 0..9"):
        LabelShift([[0, 10]], [1.0]).split(digits, 2, 10, 5, seed=0)
