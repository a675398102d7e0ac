"""Scoring pulled models on a client's own training data (DAC's s_ij = 1 / loss).

A DAC peer computes the mean loss of every model it pulls on its own training set, n times
per round, so this is the hottest inference loop of a run. A :class:`Scorer` is built once
per client: it keeps the client's data in the form the model's fastest inference path
wants ("transform each client's data once") and scores a state dict without touching the
peer's own model.

For the paper's 28x28 CNN (:class:`~zmqgossip.models.CNN28`) the data are kept as phase
patches, so that conv1 + ReLU + 2x2 max-pool become one matrix product per pooling phase
and a maximum (see :class:`_CNN28Patches`); only the outputs the network uses are
computed, the uniform background of digit images once per batch, and fc1 reads the pooled
conv2 outputs in the order they are in. The logits are
those of ``CNN28.forward`` to float rounding (fc1 adds its inputs in another order; the
losses of trained models on MNIST differ by at most a few 1e-8, relative;
``tests/test_scoring.py`` holds them to 1e-6). Every other model is loaded into a scratch
copy and evaluated with :func:`zmqgossip.learning.mean_loss`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import learning
from .flat import FlatModel
from .models import CNN28
from .wire import Message

__all__ = ["Scorer"]


class _CNN28Patches:
    """CNN28's logits from the images' phase patches.

    conv1 (3x3) followed by a 2x2 max-pool: the pooled value at (i, j) is the maximum over
    the four phases (a, b) of the convolution at (2i+a, 2j+b), and all four read the 4x4
    input window at (2i, 2j). So each pooled position is one row of 16*C input values, and
    phase (a, b) is a matrix product with the 3x3 kernel placed at offset (a, b) in a 4x4
    of zeros. ``max(conv) + bias`` then ReLU equals pooling the ReLU of ``conv + bias``
    exactly (rounding and ReLU are monotone). conv2's 2x2 pool (floor) reads only its first
    10x10 outputs, so only the first 12x12 pooled conv1 outputs are computed.

    Memory: 144 x 16 x C floats per image (9 KiB), kept for the client's training set; on
    MNIST about half of that, as the background windows are kept once per batch. A scored
    model costs about half the module path's time on one core (MNIST, batches of 200).
    """

    SIDE = 12  # pooled conv1 outputs that conv2 + its pool read, per side
    # Samples per batch: half the per-op overhead of batches of 100, while the intermediates
    # (7.4 MB for conv1's four phases) still fit in a typical L3 cache; larger ones do not.
    BATCH = 200
    # The background path when at least this share of the windows is background: gathering
    # the other windows costs a small fraction of computing them all, so it pays well before
    # this share; below it the saving is too small to be worth a second code path.
    MIN_BACKGROUND = 0.25

    def __init__(self, x: torch.Tensor, batch: int = BATCH, skip_background: bool = True) -> None:
        n, c = int(x.shape[0]), int(x.shape[1])
        s = self.SIDE
        windows = x.unfold(2, 4, 2).unfold(3, 4, 2)[:, :, :s, :s]  # N, C, 13->12, 12, 4, 4
        self.rows = s * s  # rows per image
        patches = windows.permute(0, 2, 3, 1, 4, 5).reshape(n * self.rows, c * 16).contiguous()
        self.channels, self.n, self.batch = c, n, batch
        self.patches: torch.Tensor | None = patches
        # Background: digits sit on a uniform field (a raw black pixel, normalised), so about
        # half of MNIST's windows are one and the same row of values, the top-left window of
        # the first image. All of them give the same conv1 output. Each batch then keeps its
        # other windows and one background row, in a block, and the product runs on that
        # block; a gather puts the background's output back in place. Half the windows and
        # half the memory on MNIST. Data with no such field keep the dense rows.
        is_bg = (patches == patches[0]).all(dim=1)
        if skip_background and float(is_bg.float().mean()) >= self.MIN_BACKGROUND:
            blocks, where, starts = [], [], [0]
            for lo in range(0, n, batch):
                rows, bg = patches[lo * self.rows : (lo + batch) * self.rows], is_bg[lo * self.rows : (lo + batch) * self.rows]
                fg = rows[~bg]
                blocks += [fg, patches[:1]]  # the background row last
                local = torch.cumsum(~bg, 0, dtype=torch.int32) - 1
                where.append(torch.where(bg, torch.tensor(fg.shape[0], dtype=torch.int32), local))
                starts.append(starts[-1] + fg.shape[0] + 1)
            self.blocks = torch.cat(blocks)  # per batch: its foreground rows, then the background
            self.where = torch.cat(where)  # per window: its row in its batch's block
            self.starts = starts  # where each batch's block begins
            self.patches = None

    @property
    def windows_computed(self) -> float:
        """Share of conv1's windows the product runs on (1.0: no background path)."""
        return 1.0 if self.patches is not None else self.blocks.shape[0] / (self.n * self.rows)

    def _rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows conv1's product runs on for samples lo:hi, and where each window's
        output is among them (None: one row per window, in order)."""
        if self.patches is not None:
            return self.patches[lo * self.rows : hi * self.rows], None
        j = lo // self.batch
        if lo % self.batch == 0 and hi == min(self.n, lo + self.batch):  # one of the Scorer's batches
            return self.blocks[self.starts[j] : self.starts[j + 1]], self.where[lo * self.rows : hi * self.rows]
        # Any other range (not on the hot path): the windows themselves, gathered.
        r = torch.arange(lo * self.rows, hi * self.rows)
        start = torch.tensor(self.starts[:-1])[r // (self.batch * self.rows)]
        return self.blocks.index_select(0, start + self.where[r]), None

    def prepare(self, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-model weights in the forms :meth:`logits` uses: conv1's phase kernels, and
        fc1's weight with its inputs in (H, W, C) order, the order the pooled conv2 outputs
        are in (permuting 51k weights once per model is cheaper than the activations of
        every batch)."""
        fc1 = state["classifier.1.weight"]
        c = int(state["features.3.weight"].shape[0])
        side = (self.SIDE - 2) // 2
        fc1_hwc = fc1.view(fc1.shape[0], c, side, side).permute(0, 2, 3, 1).reshape(fc1.shape[0], -1)
        return self.phase_kernels(state["features.0.weight"]), fc1_hwc

    def phase_kernels(self, w1: torch.Tensor) -> torch.Tensor:
        """(4, 16*C, out) matrices: conv1's kernel at offset (a, b) of a 4x4 window, per phase."""
        out, c = int(w1.shape[0]), self.channels
        k = w1.permute(1, 2, 3, 0)  # C, 3, 3, out
        w = w1.new_zeros(4, c, 4, 4, out)
        for phase, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            w[phase, :, a : a + 3, b : b + 3] = k
        return w.view(4, c * 16, out)

    def logits(
        self, state: Mapping[str, torch.Tensor], prepared: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int
    ) -> torch.Tensor:
        """Logits of samples ``lo:hi``; ``prepared`` is :meth:`prepare` of ``state``."""
        w4, fc1_hwc = prepared
        n, s = hi - lo, self.SIDE
        rows, where = self._rows(lo, hi)
        h = torch.matmul(rows, w4)  # 4, rows, 16: one product per pooling phase
        torch.maximum(h[0], h[1], out=h[0])
        torch.maximum(h[2], h[3], out=h[2])
        h = torch.maximum(h[0], h[2], out=h[0])
        h += state["features.0.bias"]
        h.relu_()
        if where is not None:
            h = h.index_select(0, where)  # every window of the batch, in order
        h = h.view(n, s, s, -1).permute(0, 3, 1, 2)  # NCHW view of NHWC memory (channels-last)
        h = F.conv2d(h, state["features.3.weight"], state["features.3.bias"])  # n, 32, 10, 10
        v = h.permute(0, 2, 3, 1)  # NHWC view
        v = v.reshape(n, (s - 2) // 2, 2, (s - 2) // 2, 2, v.shape[-1])
        # 2x2 max-pool as the maximum of four strided views: plain elementwise kernels on the
        # NHWC layout, cheaper than max_pool2d's general path
        p = torch.maximum(torch.maximum(v[:, :, 0, :, 0], v[:, :, 0, :, 1]), torch.maximum(v[:, :, 1, :, 0], v[:, :, 1, :, 1]))
        p.relu_()
        h = F.linear(p.reshape(n, -1), fc1_hwc, state["classifier.1.bias"]).relu_()  # (H, W, C) order
        return F.linear(h, state["classifier.3.weight"], state["classifier.3.bias"])


class Scorer:
    """Mean loss of any state dict of ``model``'s architecture on one client's (x, y).

    ``model`` is a scratch copy the scorer may overwrite (the peer's own model is never
    touched); states are expected to match its schema (the wire checks that on receive).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> None:
        if int(x.shape[0]) != int(y.shape[0]):
            raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        if int(y.shape[0]) == 0:
            raise ValueError("no samples to score on")
        shape = tuple(int(s) for s in x.shape[1:])
        is_cnn28 = isinstance(model, CNN28) and shape[1:] == (28, 28)
        if batch_size is None:
            batch_size = _CNN28Patches.BATCH if is_cnn28 else learning.EVAL_BATCH
        self._cnn28 = _CNN28Patches(x, batch_size) if is_cnn28 else None
        self.model, self.x, self.y, self.batch_size = model, x, y, batch_size
        # A pulled model loads into the scratch model as one copy of its data frame.
        self._flat = FlatModel.adopt(model) if self._cnn28 is None else None

    @property
    def windows_computed(self) -> float:
        """Share of the CNN28's conv1 windows the product runs on (1.0 for any other path)."""
        return self._cnn28.windows_computed if self._cnn28 is not None else 1.0

    def mean_loss_of(self, msg: Message) -> float:
        """:meth:`mean_loss` of the model a message carries (its values checked)."""
        msg.require_checked()
        if self._flat is None:
            return self.mean_loss(msg.tensors)
        self._flat.load(self._flat.frame_of(msg))
        return learning.mean_loss(self.model, self.x, self.y, self.batch_size)

    def mean_loss(self, state: Mapping[str, torch.Tensor]) -> float:
        """Mean cross-entropy over the client's data of the model with parameters ``state``."""
        if self._cnn28 is None:
            self.model.load_state_dict(state)
            return learning.mean_loss(self.model, self.x, self.y, self.batch_size)
        n, bs, k = int(self.y.shape[0]), self.batch_size, self._cnn28
        total = torch.zeros((), dtype=torch.float64)
        with torch.inference_mode():
            prepared = k.prepare(state)
            for lo in range(0, n, bs):
                hi = min(n, lo + bs)
                total += F.cross_entropy(k.logits(state, prepared, lo, hi), self.y[lo:hi], reduction="sum").double()
        return float(total) / n
