"""Wire codec throughput: snapshot + reply + decode with schema check, vs memcpy.

For each model, measured in the same run:
  memcpy        numpy ``np.copyto`` of the same number of bytes into a preallocated array
  encode        ``ModelPayload.from_frame`` of a ``FlatModel`` (what a peer publishes: its
                tensors live in one buffer laid out as the data frame, so the snapshot is
                one copy into the publisher's reusable ``SnapshotMemory``) + ``reply``
  encode dict   ``ModelPayload.build`` of a state dict (one copy per tensor) + ``reply``
  decode        ``decode(frames, expect=schema)``: every check, values included (one pass
                per dtype), no copy; the model is the checked data frame
  views         decode + ``Message.tensors`` (a view per tensor, made on first use)
  both          encode + decode + ``FlatModel.frame_of`` (the received model, ready to be
                loaded or mixed by the peer): the figure compared with memcpy (target ratio
                >= 0.5 at 10 MB; target <= 20 us for the 0.25 MB model)
  both dict     encode dict + views: the same round trip for a model kept as a state dict

Models: the paper's 0.25 MB CNN (10 tensors), a 10 MB MLP, and 0.25 MB of float32 in 10
and in 100 tensors: the cost per message should not grow with the number of tensors
(a model travels as one data frame, checked in one pass per dtype).

The table gives medians over all calls; the ratio is the median over rounds of the
ratio within a round (the steps alternate, round by round, to share the machine's load).

Timing is never asserted. Usage: python benchmarks/bench_wire.py [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _common import MB, MODELS, environment, json_line, median, state_bytes, table, time_loop

from zmqgossip import wire
from zmqgossip.flat import FlatModel

ROUNDS = 5


def split_state(n: int, total: int = 65_536) -> dict[str, torch.Tensor]:
    """``total`` float32 values in ``n`` tensors of (nearly) equal size."""
    g = torch.Generator().manual_seed(n)
    sizes = [total // n + (i < total % n) for i in range(n)]
    return {f"layer{i}.weight": torch.randn(s, generator=g) * 0.1 for i, s in enumerate(sizes)}


STATES = {**MODELS, "10 tensors": lambda _: split_state(10), "100 tensors": lambda _: split_state(100)}


class _Holder(torch.nn.Module):
    """A module whose parameters are ``state``'s tensors (to make a FlatModel of them)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for k, v in state.items():
            self.register_parameter(k.replace(".", "_"), torch.nn.Parameter(v.clone(), requires_grad=False))


def measure(name: str, min_time: float) -> dict[str, float]:
    state = STATES[name](0)
    nbytes = state_bytes(state)
    src = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    dst = np.empty_like(src)
    holder = _Holder(state)
    flat = FlatModel.adopt(holder)
    live = holder.state_dict()  # the same values under the holder's names
    schema = wire.schema_of(live)

    def memcpy() -> None:
        np.copyto(dst, src)

    counter = iter(range(1, 2**62))
    memory = wire.SnapshotMemory()  # as a publishing peer has
    memory_dict = wire.SnapshotMemory()

    def encode() -> list:
        p = wire.ModelPayload.from_frame(flat.frame(), flat.layout, step=1, version=1, n_samples=400, memory=memory)
        return p.reply(1, next(counter))

    def encode_dict() -> list:
        p = wire.ModelPayload.build(live, step=1, version=1, n_samples=400, memory=memory_dict)
        return p.reply(1, next(counter))

    frames = encode()

    def decode() -> wire.Message:
        return wire.decode(frames, expect=schema)

    def views() -> dict:
        return wire.decode(frames, expect=schema).tensors

    def both() -> np.ndarray:
        return flat.frame_of(wire.decode(encode(), expect=schema))

    def both_dict() -> dict:
        return wire.decode(encode_dict(), expect=schema).tensors

    # correctness once, outside the clock
    assert bytes(both()) == bytes(flat.frame())
    got = both_dict()
    assert all(torch.equal(got[k], live[k]) for k in live)

    # Interleave the measurements over several rounds, so that load from other
    # processes hits all alike; the ratio is taken within each round, then the median.
    fns = {"memcpy": memcpy, "encode": encode, "encode_dict": encode_dict, "decode": decode, "views": views,
           "both": both, "both_dict": both_dict}
    runs: dict[str, list[float]] = {k: [] for k in fns}
    round_medians: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for k, fn in fns.items():
            ts = time_loop(fn, min_time / ROUNDS)
            runs[k] += ts
            round_medians[k].append(median(ts))
    out = {"bytes": float(nbytes), "tensors": len(state), "calls": {k: len(v) for k, v in runs.items()}}
    for k, ts in runs.items():
        out[f"{k}_us"] = median(ts) * 1e6
        out[f"{k}_GBps"] = nbytes / median(ts) / 1e9
    out["ratio_both_vs_memcpy"] = median([m / b for m, b in zip(round_medians["memcpy"], round_medians["both"])])
    out["ratio_rounds"] = [m / b for m, b in zip(round_medians["memcpy"], round_medians["both"])]
    out["ratio_both_dict_vs_both"] = median([d / b for d, b in zip(round_medians["both_dict"], round_medians["both"])])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny run (seconds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    min_time = 0.3 if args.quick else 3.0

    results = {name: measure(name, min_time) for name in STATES}

    rows = []
    for name, r in results.items():
        for k in ("memcpy", "encode", "encode_dict", "decode", "views", "both", "both_dict"):
            rows.append([name, k, r[f"{k}_us"], r[f"{k}_GBps"], r[f"{k}_GBps"] / r["memcpy_GBps"]])
    print(f"wire codec, median per call, torch threads = {torch.get_num_threads()}")
    print(table(["model", "step", "us/call", "GB/s", "x memcpy"], rows))
    for name, r in results.items():
        print(f"{name} ({r['bytes'] / MB:.2f} MiB, {r['tensors']} tensors): encode+decode {r['both_us']:.1f} us, "
              f"at {r['ratio_both_vs_memcpy']:.2f} x memcpy"
              + (" (target >= 0.5)" if name == "10MB" else " (target <= 20 us)" if name == "0.25MB" else "")
              + f"; as a state dict {r['both_dict_us']:.1f} us ({r['ratio_both_dict_vs_both']:.2f} x)")
    flat = results["100 tensors"]["both_us"] / results["10 tensors"]["both_us"]
    flat_dict = results["100 tensors"]["both_dict_us"] / results["10 tensors"]["both_dict_us"]
    print(f"100 vs 10 tensors of the same 0.25 MB: encode+decode x {flat:.2f} (flat in tensor count: ~1); "
          f"as a state dict x {flat_dict:.2f}")
    json_line("wire", {"env": environment(), "quick": args.quick, "tensors_100_vs_10": flat,
                       "tensors_100_vs_10_dict": flat_dict, **results})


if __name__ == "__main__":
    main()
