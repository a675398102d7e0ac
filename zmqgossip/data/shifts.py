"""Partitioners: split a Dataset over clients grouped in clusters with different tasks.

Each partitioner records every client's true cluster, so that oracle baselines and
reports can use it. Rules shared by all of them:

- clients per cluster = fractions * n_clients, rounded by largest remainder so the counts
  sum to n_clients; a cluster with a positive fraction gets at least one client;
- a client's train + validation samples are drawn without replacement from its
  cluster's pool (never shared with another client of that pool);
- the test set of a cluster is built once and its tensors are shared by all its clients
  (a thousand peers must fit in memory);
- the same seed gives the same partition.
Bad settings raise :class:`DataError` before any work.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .datasets import DataError, Dataset

__all__ = [
    "ClientData",
    "Partition",
    "LabelShift",
    "LabelPermutation",
    "Rotation",
    "allocate_clients",
    "rotate",
    "PAPER_LABEL_SHIFT",
    "PAPER_ROTATION",
    "BALANCED_ROTATION",
]


@dataclass(eq=False)  # holds tensors: compare by identity
class ClientData:
    """One client's data. ``indices`` are the rows of ``Dataset.x`` it holds (train, then val)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    cluster: int
    indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    @property
    def n_train(self) -> int:
        return int(self.train_y.shape[0])


@dataclass(eq=False)
class Partition:
    """All clients of one setting, with their true clusters."""

    clients: list[ClientData]
    clusters: list[int]
    cluster_names: list[str]
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def n_clusters(self) -> int:
        return len(self.cluster_names)

    def members(self, cluster: int) -> list[int]:
        """Client ids of one cluster."""
        return [i for i, c in enumerate(self.clusters) if c == cluster]


# ------------------------------------------------------------------------------ helpers


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as e:
        raise DataError(f"fractions must be numbers, got {fractions!r}") from e
    if not fr:
        raise DataError("fractions must not be empty")
    if any(not math.isfinite(f) or f < 0 for f in fr):
        raise DataError(f"fractions must be finite and >= 0, got {list(fr)}")
    if abs(sum(fr) - 1.0) > 1e-6:
        raise DataError(f"fractions must sum to 1, got {list(fr)} (sum {sum(fr):.9g})")
    return fr


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_sizes(n_clients: object, n_train: object, n_val: object) -> tuple[int, int, int]:
    return (
        _check_int("n_clients", n_clients, 1),
        _check_int("n_train", n_train, 1),
        _check_int("n_val", n_val, 1),
    )


def _check_test_split(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if data.test_x is None or data.test_y is None:
        raise DataError(
            f"data set {data.name!r} has no test split: load it with test_per_class=<k> "
            "to hold out k images per class"
        )
    return data.test_x, data.test_y


def allocate_clients(fractions: Sequence[float], n_clients: int) -> list[int]:
    """Clients per cluster by largest remainder; each positive fraction gets >= 1 client.

    >>> allocate_clients([0.7, 0.2, 0.05, 0.05], 20)
    [14, 4, 1, 1]
    """
    fr = _check_fractions(fractions)
    n = _check_int("n_clients", n_clients, 1)
    total = sum(fr)
    raw = [f / total * n for f in fr]
    counts = [math.floor(r + 1e-9) for r in raw]
    # Ties go to the earlier cluster, so the result does not depend on float noise order.
    order = sorted(range(len(fr)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    positive = [i for i, f in enumerate(fr) if f > 0]
    if n < len(positive):
        raise DataError(
            f"{n} clients cannot cover {len(positive)} clusters with a positive fraction: "
            f"use n_clients >= {len(positive)}"
        )
    for i in positive:
        if counts[i] == 0:  # tiny fraction rounded away: take one from the largest cluster
            j = max(range(len(counts)), key=lambda k: (counts[k], -k))
            counts[j] -= 1
            counts[i] = 1
    return counts


def _check_fit(pool_size: int, count: int, need: int, what: str, hint: str = "") -> None:
    """Raise DataError if ``count`` clients of ``need`` samples do not fit in the pool."""
    if count * need > pool_size:
        fit_clients = pool_size // need
        fit_samples = pool_size // max(count, 1)
        raise DataError(
            f"{what}: {count} clients x {need} samples (train + val) = {count * need} "
            f"exceeds the pool of {pool_size} images; it fits {fit_clients} clients of "
            f"{need} samples, or {count} clients of at most {fit_samples} samples{hint}"
        )


def _client(
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    n_train: int,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    cluster: int,
) -> ClientData:
    return ClientData(
        train_x=x[idx[:n_train]],
        train_y=y[idx[:n_train]],
        val_x=x[idx[n_train:]],
        val_y=y[idx[n_train:]],
        test_x=test_x,
        test_y=test_y,
        cluster=cluster,
        indices=idx,
    )


def rotate(x: torch.Tensor, angle: float, fill: torch.Tensor | float | None = None) -> torch.Tensor:
    """Rotate images (..., C, H, W) counter-clockwise by ``angle`` degrees.

    Multiples of 90 are exact (``torch.rot90(x, k, dims=(-2, -1))``); other angles use
    bilinear resampling about the image centre, filling the uncovered corners with
    ``fill`` (per channel, shape (C, 1, 1), or a scalar; default 0).
    """
    a = float(angle) % 360.0
    if a % 90.0 == 0.0:
        k = int(a // 90.0)
        return x.clone() if k == 0 else torch.rot90(x, k, dims=(-2, -1)).contiguous()
    shape = x.shape
    imgs = x.reshape(-1, *shape[-3:]).float()
    h, w = shape[-2], shape[-1]
    r = math.radians(a)
    c, s = math.cos(r), math.sin(r)
    # affine_grid maps output to input coordinates (x right, y down, normalised to [-1, 1]);
    # the inverse of a visual counter-clockwise turn, corrected for the aspect ratio.
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=imgs.dtype)
    grid = F.affine_grid(theta.expand(imgs.shape[0], 2, 3), list(imgs.shape), align_corners=False)
    f = torch.as_tensor(0.0 if fill is None else fill, dtype=imgs.dtype)
    # grid_sample pads with zeros: shift so that "zero" is the wanted fill value.
    out = F.grid_sample(imgs - f, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + f).to(x.dtype).reshape(shape)


# ----------------------------------------------------------------------------- shifts


@dataclass(frozen=True, init=False)
class LabelShift:
    """Clusters by class groups: cluster c holds only images of classes ``groups[c]``.

    Labels keep their original values (the model keeps all ``num_classes`` outputs); the
    cluster's test set is the test split restricted to its classes. Groups may overlap;
    each cluster then draws from its own pool.
    """

    groups: tuple[tuple[int, ...], ...]
    fractions: tuple[float, ...]

    def __init__(self, groups: Sequence[Sequence[int]], fractions: Sequence[float]) -> None:
        fr = _check_fractions(fractions)
        gs: list[tuple[int, ...]] = []
        for g in groups:
            try:
                cls = tuple(g)
            except TypeError as e:
                raise DataError(f"each group must be a list of class ids, got {g!r}") from e
            if not cls:
                raise DataError("a class group must not be empty")
            for c in cls:
                if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0:
                    raise DataError(f"class ids must be integers >= 0, got {c!r} in group {list(cls)}")
            if len(set(cls)) != len(cls):
                raise DataError(f"group {list(cls)} repeats a class")
            gs.append(tuple(int(c) for c in cls))
        if len(gs) != len(fr):
            raise DataError(f"{len(gs)} groups but {len(fr)} fractions")
        object.__setattr__(self, "groups", tuple(gs))
        object.__setattr__(self, "fractions", fr)

    @classmethod
    def random_groups(
        cls,
        k: int,
        classes_per_cluster: int,
        num_classes: int,
        fractions: Sequence[float] | None = None,
        seed: int = 0,
    ) -> "LabelShift":
        """k distinct random class groups of ``classes_per_cluster`` classes each.

        Disjoint when k * classes_per_cluster <= num_classes; otherwise windows over a
        random class order, at evenly spread offsets (they overlap but stay distinct).
        """
        num_classes = _check_int("num_classes", num_classes, 1)
        k = _check_int("k", k, 1)
        cpc = _check_int("classes_per_cluster", classes_per_cluster, 1)
        if k > num_classes:
            raise DataError(f"cannot make {k} clusters from {num_classes} classes (k <= num_classes)")
        if cpc > num_classes:
            raise DataError(f"classes_per_cluster={cpc} exceeds num_classes={num_classes}")
        order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
        if k * cpc <= num_classes:
            groups = [order[i * cpc : (i + 1) * cpc] for i in range(k)]
        else:
            starts = [round(i * num_classes / k) for i in range(k)]
            groups = [[order[(s + j) % num_classes] for j in range(cpc)] for s in starts]
        groups = [sorted(g) for g in groups]
        return cls(groups, fractions if fractions is not None else [1.0 / k] * k)

    def split(self, data: Dataset, n_clients: int, n_train: int, n_val: int, seed: int) -> Partition:
        n_clients, n_train, n_val = _check_sizes(n_clients, n_train, n_val)
        test_x, test_y = _check_test_split(data)
        for g in self.groups:
            if max(g) >= data.num_classes:
                raise DataError(
                    f"group {list(g)} has classes outside 0..{data.num_classes - 1} of {data.name!r}"
                )
        counts = allocate_clients(self.fractions, n_clients)
        need = n_train + n_val
        names = [f"classes {','.join(map(str, g))}" for g in self.groups]
        pools = [torch.isin(data.y, torch.tensor(g)).nonzero().flatten() for g in self.groups]
        for c, pool in enumerate(pools):  # all checks before any drawing
            _check_fit(len(pool), counts[c], need, f"cluster {c} ({names[c]}) of {data.name!r}")
        gen = torch.Generator().manual_seed(seed)
        clients: list[ClientData] = []
        for c, (g, pool) in enumerate(zip(self.groups, pools)):
            mask = torch.isin(test_y, torch.tensor(g))
            tx, ty = test_x[mask], test_y[mask]  # one copy per cluster, shared by its clients
            drawn = pool[torch.randperm(len(pool), generator=gen)[: counts[c] * need]]
            for j in range(counts[c]):
                clients.append(_client(data.x, data.y, drawn[j * need : (j + 1) * need], n_train, tx, ty, c))
        return Partition(
            clients=clients,
            clusters=[cl.cluster for cl in clients],
            cluster_names=names,
            num_classes=data.num_classes,
            input_shape=data.input_shape,
        )


def _draw_shared(
    n: int, counts: list[int], need: int, gen: torch.Generator, overlap: bool
) -> list[torch.Tensor]:
    """Per cluster, ``counts[c] * need`` row indices of an IID pool of ``n`` images.

    Without overlap all clusters share one draw without replacement; with it each
    cluster draws independently (samples may repeat across clusters, never within one).
    """
    out = []
    if overlap:
        for cnt in counts:
            out.append(torch.randperm(n, generator=gen)[: cnt * need])
    else:
        perm = torch.randperm(n, generator=gen)
        start = 0
        for cnt in counts:
            out.append(perm[start : start + cnt * need])
            start += cnt * need
    return out


@dataclass(frozen=True, init=False)
class LabelPermutation:
    """Same images, labels permuted differently per cluster (cluster 0 is the identity).

    The permutations are drawn from ``seed`` (distinct from each other); client samples
    come from one IID pool without replacement unless ``allow_overlap``.
    """

    fractions: tuple[float, ...]
    seed: int
    allow_overlap: bool

    def __init__(self, fractions: Sequence[float], seed: int = 0, *, allow_overlap: bool = False) -> None:
        object.__setattr__(self, "fractions", _check_fractions(fractions))
        object.__setattr__(self, "seed", int(seed))
        object.__setattr__(self, "allow_overlap", bool(allow_overlap))

    def permutations(self, num_classes: int) -> list[torch.Tensor]:
        """The label map of each cluster: new_label = perm[old_label]."""
        k = len(self.fractions)
        if k > math.factorial(min(num_classes, 20)):
            raise DataError(f"{k} clusters but only {math.factorial(num_classes)} label permutations")
        gen = torch.Generator().manual_seed(self.seed)
        perms = [torch.arange(num_classes)]
        seen = {tuple(perms[0].tolist())}
        while len(perms) < k:
            p = torch.randperm(num_classes, generator=gen)
            if tuple(p.tolist()) not in seen:
                seen.add(tuple(p.tolist()))
                perms.append(p)
        return perms

    def split(self, data: Dataset, n_clients: int, n_train: int, n_val: int, seed: int) -> Partition:
        n_clients, n_train, n_val = _check_sizes(n_clients, n_train, n_val)
        test_x, test_y = _check_test_split(data)
        counts = allocate_clients(self.fractions, n_clients)
        need = n_train + n_val
        n = len(data.y)
        hint = "" if self.allow_overlap else " (or set allow_overlap=True to let clusters reuse images)"
        if self.allow_overlap:
            for c, cnt in enumerate(counts):
                _check_fit(n, cnt, need, f"cluster {c} of {data.name!r}")
        else:
            _check_fit(n, n_clients, need, f"all clusters of {data.name!r}", hint)
        perms = self.permutations(data.num_classes)
        names = ["perm identity"] + [f"perm {','.join(map(str, p.tolist()))}" for p in perms[1:]]
        gen = torch.Generator().manual_seed(seed)
        draws = _draw_shared(n, counts, need, gen, self.allow_overlap)
        clients: list[ClientData] = []
        for c, (perm, drawn) in enumerate(zip(perms, draws)):
            ty = perm[test_y]  # test images are shared as is; only labels change
            ys = perm[data.y]
            for j in range(counts[c]):
                clients.append(_client(data.x, ys, drawn[j * need : (j + 1) * need], n_train, test_x, ty, c))
        return Partition(clients, [cl.cluster for cl in clients], names, data.num_classes, data.input_shape)


@dataclass(frozen=True, init=False)
class Rotation:
    """Covariate shift: IID labels, images of cluster c rotated by ``angles[c]`` degrees.

    Rotation happens once, at split time. All clusters draw from one pool without
    replacement unless ``allow_overlap``, in which case each draws independently.
    """

    angles: tuple[float, ...]
    fractions: tuple[float, ...]
    allow_overlap: bool

    def __init__(self, angles: Sequence[float], fractions: Sequence[float], allow_overlap: bool = False) -> None:
        fr = _check_fractions(fractions)
        angs: list[float] = []
        for a in angles:
            if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(float(a)):
                raise DataError(f"rotation angles must be finite numbers (degrees), got {a!r}")
            angs.append(float(a))
        if len(angs) != len(fr):
            raise DataError(f"{len(angs)} angles but {len(fr)} fractions")
        object.__setattr__(self, "angles", tuple(angs))
        object.__setattr__(self, "fractions", fr)
        object.__setattr__(self, "allow_overlap", bool(allow_overlap))

    def split(self, data: Dataset, n_clients: int, n_train: int, n_val: int, seed: int) -> Partition:
        n_clients, n_train, n_val = _check_sizes(n_clients, n_train, n_val)
        test_x, test_y = _check_test_split(data)
        counts = allocate_clients(self.fractions, n_clients)
        need = n_train + n_val
        n = len(data.y)
        if self.allow_overlap:
            for c, cnt in enumerate(counts):
                _check_fit(n, cnt, need, f"cluster {c} (rot {self.angles[c]:g}) of {data.name!r}")
        else:
            _check_fit(
                n, n_clients, need, f"all clusters of {data.name!r}",
                " (or set allow_overlap=True to let rotation clusters reuse images)",
            )
        names = [f"rot {a:g}" for a in self.angles]
        fill = data.background  # rotated-in corners are black in raw pixel terms
        gen = torch.Generator().manual_seed(seed)
        draws = _draw_shared(n, counts, need, gen, self.allow_overlap)
        clients: list[ClientData] = []
        for c, (angle, drawn) in enumerate(zip(self.angles, draws)):
            if counts[c] == 0:
                continue
            tx = rotate(test_x, angle, fill)  # once per cluster, shared by its clients
            # Rotate all of the cluster's samples in one call, then hand out slices (copies).
            xs = rotate(data.x[drawn], angle, fill)
            ys = data.y[drawn]
            for j in range(counts[c]):
                lo, mid, hi = j * need, j * need + n_train, (j + 1) * need
                clients.append(
                    ClientData(
                        train_x=xs[lo:mid].clone(),
                        train_y=ys[lo:mid].clone(),
                        val_x=xs[mid:hi].clone(),
                        val_y=ys[mid:hi].clone(),
                        test_x=tx,
                        test_y=test_y,
                        cluster=c,
                        indices=drawn[lo:hi].clone(),
                    )
                )
        return Partition(clients, [cl.cluster for cl in clients], names, data.num_classes, data.input_shape)


PAPER_LABEL_SHIFT = LabelShift([[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]], [0.4, 0.6])
PAPER_ROTATION = Rotation([0, 180, 10, 350], [0.7, 0.2, 0.05, 0.05])
BALANCED_ROTATION = Rotation([0, 90, 180, 270], [0.25] * 4)
