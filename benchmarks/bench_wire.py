"""Wire codec throughput: encode (snapshot) + reply + decode with schema check, vs memcpy.

For each model, measured in the same run:
  memcpy   numpy ``np.copyto`` of the same number of bytes into a preallocated array
  encode   ``ModelPayload.build`` (one copy: the snapshot, into the publisher's reusable
           ``SnapshotMemory``) + ``reply``
  decode   ``decode(frames, expect=schema)`` (no copy; finite check reads every value)
  both     encode + decode, the figure compared with memcpy (target ratio >= 0.5 at 10 MB;
           target <= 20 us for the 0.25 MB model)

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

ROUNDS = 5


def split_state(n: int, total: int = 65_536) -> dict[str, torch.Tensor]:
    """``total`` float32 values in ``n`` tensors of (nearly) equal size."""
    g = torch.Generator().manual_seed(n)
    sizes = [total // n + (i < total % n) for i in range(n)]
    return {f"layer{i}.weight": torch.randn(s, generator=g) * 0.1 for i, s in enumerate(sizes)}


STATES = {**MODELS, "10 tensors": lambda _: split_state(10), "100 tensors": lambda _: split_state(100)}


def measure(name: str, min_time: float) -> dict[str, float]:
    state = STATES[name](0)
    nbytes = state_bytes(state)
    schema = wire.schema_of(state)
    src = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    dst = np.empty_like(src)

    def memcpy() -> None:
        np.copyto(dst, src)

    counter = iter(range(1, 2**62))
    memory = wire.SnapshotMemory()  # as a publishing peer has

    def encode() -> list:
        p = wire.ModelPayload.build(state, step=1, version=1, n_samples=400, memory=memory)
        return p.reply(1, next(counter))

    frames = encode()

    def decode() -> wire.Message:
        return wire.decode(frames, expect=schema)

    def both() -> wire.Message:
        return wire.decode(encode(), expect=schema)

    # correctness once, outside the clock
    got = both().tensors
    assert all(torch.equal(got[k], state[k]) for k in state)

    # Interleave the four measurements over several rounds, so that load from other
    # processes hits all alike; the ratio is taken within each round, then the median.
    fns = {"memcpy": memcpy, "encode": encode, "decode": decode, "both": both}
    runs: dict[str, list[float]] = {k: [] for k in fns}
    round_medians: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for k, fn in fns.items():
            ts = time_loop(fn, min_time / ROUNDS)
            runs[k] += ts
            round_medians[k].append(median(ts))
    out = {"bytes": float(nbytes), "calls": {k: len(v) for k, v in runs.items()}}
    for k, ts in runs.items():
        out[f"{k}_us"] = median(ts) * 1e6
        out[f"{k}_GBps"] = nbytes / median(ts) / 1e9
    out["ratio_both_vs_memcpy"] = median([m / b for m, b in zip(round_medians["memcpy"], round_medians["both"])])
    out["ratio_rounds"] = [m / b for m, b in zip(round_medians["memcpy"], round_medians["both"])]
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
        for k in ("memcpy", "encode", "decode", "both"):
            rows.append([name, k, r[f"{k}_us"], r[f"{k}_GBps"], r[f"{k}_GBps"] / r["memcpy_GBps"]])
    print(f"wire codec, median per call, torch threads = {torch.get_num_threads()}")
    print(table(["model", "step", "us/call", "GB/s", "x memcpy"], rows))
    for name, r in results.items():
        print(f"{name} ({r['bytes'] / MB:.2f} MiB): encode+decode {r['both_us']:.1f} us, at {r['ratio_both_vs_memcpy']:.2f} x memcpy"
              + (" (target >= 0.5)" if name == "10MB" else " (target <= 20 us)" if name == "0.25MB" else ""))
    flat = results["100 tensors"]["both_us"] / results["10 tensors"]["both_us"]
    print(f"100 vs 10 tensors of the same 0.25 MB: encode+decode x {flat:.2f} (flat in tensor count: ~1)")
    json_line("wire", {"env": environment(), "quick": args.quick, "tensors_100_vs_10": flat, **results})


if __name__ == "__main__":
    main()
