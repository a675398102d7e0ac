"""A model whose tensors live in one buffer laid out as the wire's data frame.

A peer publishes its model every round and mixes in the models it pulls. With each
parameter in its own memory, both are a torch call per tensor; with the parameters as
views into one buffer laid out exactly as a :mod:`~zmqgossip.wire` data frame, a snapshot
is one copy of the buffer, loading a pulled model is one copy of its frame, and the
weighted average is one weighted sum per dtype over the whole frame.

The module keeps ordinary ``nn.Parameter`` objects (optimizers, ``state_dict`` and
``load_state_dict`` work as before); only their memory moves. A tensor whose memory
format is not C order (the CNNs' channels-last conv weights, kept for oneDNN's speed)
stays in its own memory, and its slot in the buffer is refreshed when the frame is read
and written back when the frame changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from . import wire
from .learning import normalised_weights

__all__ = ["FlatModel"]

class FlatModel:
    """``model``'s parameters and buffers moved into one wire-laid-out buffer.

    Build it with :meth:`adopt` (it changes where ``model`` keeps its tensors, not their
    values). :meth:`frame` is the model as a data frame; :meth:`load` and :meth:`mix`
    set the model from frames of the same layout; :meth:`frame_of` gives a received
    message's model in this layout.
    """

    def __init__(self, layout: wire.Layout, buffer: np.ndarray, outside: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layout = layout
        self.buffer = buffer  # uint8, ``layout.size`` bytes, cache-line aligned
        self._slots = torch.from_numpy(buffer)
        # (slot in the buffer, the live tensor) of tensors kept in their own memory
        self._outside_slots = [s for s, _ in outside]
        self._outside_live = [t for _, t in outside]
        self._equal: wire.Layout | None = None  # another Layout object found equal to ours
        # Per dtype span with values to average: (start, end, torch dtype); others are copied
        self._spans = [(g.start, g.end, wire.DTYPES[g.wd][0]) for g in layout.groups
                       if g.wd in wire.FLOAT_DTYPES and g.end > g.start]

    @classmethod
    def adopt(cls, model: nn.Module) -> "FlatModel":
        """Move ``model``'s parameters and buffers into one buffer (values unchanged)."""
        state = model.state_dict(keep_vars=True)
        layout = wire.layout_of(state)
        buffer = wire.aligned_zeros(layout.size)
        slots = wire.views_of(torch.from_numpy(buffer), layout)
        outside: list[tuple[torch.Tensor, torch.Tensor]] = []
        moved: set[int] = set()
        with torch.no_grad():
            for (name, t), slot in zip(state.items(), slots):
                slot.copy_(t)
                # Strides, not is_contiguous(): a channels-last weight with one input
                # channel counts as contiguous, yet its strides steer oneDNN's choice of kernel.
                # A tensor under a second name (tied weights) lives in its first slot.
                if t.stride() != slot.stride() or t.device.type != "cpu" or id(t) in moved:
                    outside.append((slot, t.detach()))
                    continue
                moved.add(id(t))
                owner, _, attr = name.rpartition(".")
                module = model.get_submodule(owner)
                if attr in module._parameters:
                    module._parameters[attr].data = slot  # the Parameter object stays
                else:
                    module._buffers[attr] = slot
        return cls(layout, buffer, outside)

    def frame(self) -> np.ndarray:
        """The model's current values as a data frame (the buffer itself: copy to keep)."""
        if self._outside_live:
            with torch.no_grad():
                torch._foreach_copy_(self._outside_slots, self._outside_live)
        return self.buffer

    def _changed(self) -> None:
        if self._outside_live:
            with torch.no_grad():
                torch._foreach_copy_(self._outside_live, self._outside_slots)

    def frame_of(self, msg: wire.Message) -> np.ndarray:
        """A received model's bytes in this model's layout: its own frame when the sender
        laid it out the same way (the common case, no copy), else a copy re-laid."""
        if msg.data is None or msg.layout is None:
            raise ValueError("the message carries no model")
        msg.require_checked()
        same = msg.layout is self.layout or msg.layout is self._equal
        if not same and msg.layout.entries == self.layout.entries:
            same, self._equal = True, msg.layout  # the receiver's schema: the same layout again and again
        if same and msg.data.nbytes == self.layout.size:
            return msg.data
        out = wire.aligned_zeros(self.layout.size)
        if same:  # a sender that did not pad the frame's end
            out[: msg.data.nbytes] = msg.data
            return out
        theirs = {e[0]: e[1:3] for e in msg.layout.entries}
        if theirs != {e[0]: e[1:3] for e in self.layout.entries}:
            raise ValueError("the message's tensors differ from this model's")
        got = msg.tensors  # another order or other offsets: tensor by tensor, by name
        wire.copy_into(wire.views_of(torch.from_numpy(out), self.layout), {k: got[k] for k in self.layout.names})
        return out

    def load(self, frame: np.ndarray) -> None:
        """Set the model to the values of ``frame`` (one copy)."""
        np.copyto(self.buffer, frame)
        self._changed()

    def mix(self, frames: Sequence[np.ndarray], weights: Sequence[float]) -> None:
        """Set the model to the weighted mean of ``frames`` (weights normalised to sum to
        1), the same arithmetic as :func:`~zmqgossip.learning.weighted_average` over the
        frames' tensors: floating values are averaged, one weighted sum per dtype over
        the whole frame; other tensors (integer buffers) are taken from the first frame."""
        wt = normalised_weights(weights, len(frames), "frames")
        for f in frames:
            if f.dtype != np.uint8 or f.shape != self.buffer.shape:
                raise ValueError(f"a frame of {self.buffer.nbytes} bytes is expected, got {f.dtype} {f.shape}")
        tensors = [torch.from_numpy(f) for f in frames]
        if frames[0] is not self.buffer:
            np.copyto(self.buffer, frames[0])  # integer tensors and padding: from the first
        with torch.no_grad():
            for start, end, dt in self._spans:
                stacked = torch.stack([t[start:end].view(dt) for t in tensors])
                self._slots[start:end].view(dt).copy_(torch.tensordot(wt.to(dt), stacked, dims=1))
        self._changed()
