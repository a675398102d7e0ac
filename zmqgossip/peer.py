"""The peer loop: choose -> pull -> score -> update weights -> aggregate -> train -> publish.

One implementation for every way of running: the asyncio runner, worker processes and
hosts all drive :class:`Peer` objects; the sequential schedule calls :meth:`Peer.step`
in the reference code's order, the async schedule lets :meth:`Peer.run` go free.

Compute (scoring, training, evaluation, snapshotting) runs in the process's compute
thread (compute.py), so the event loop keeps answering other peers' pulls while this peer
trains; torch releases the GIL in its kernels.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from . import learning
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .compute import ComputeThread
from .config import DEFAULT_TIMEOUT_S
from .data import ClientData
from .flat import FlatModel
from .metrics import Event, RunDir
from .policies import Policy, Pulled
from .scoring import Scorer
from .net import Counters, PullResult, Transport
from .turns import Turn, Turns
from .wire import Limits, ModelPayload, SnapshotMemory, WireError, check_values

T = TypeVar("T")


@dataclass(frozen=True)
class PeerSettings:
    """What a peer needs to know about training and its budget."""

    epochs: int = 3
    batch_size: int = 8
    lr: float = 3e-4
    warmup: bool = True
    test_every: int = 5
    pull_timeout_s: float = DEFAULT_TIMEOUT_S
    speed: float = 1.0  # >1: this peer computes that many times slower
    rounds: int = 20
    seconds: float | None = None  # async budget in wall seconds (overrides rounds)
    checkpoint_every: int = 5  # rounds between checkpoints (0: never)
    checkpoint_min_s: float = 1.0  # and at least this many seconds between periodic ones
    max_sample_ratio: float = 1.0  # a pulled model weighs at most this many times my own data size


@dataclass
class PeerState:
    """Everything that changes as the peer runs (checkpointed for resume)."""

    step: int = 0  # completed updates
    version: int = 0  # published model versions
    bytes_pulled: int = 0
    compute_s: float = 0.0
    status: str = "new"  # new -> running -> done | failed
    last_val_acc: float | None = None
    last_test_acc: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Peer:
    """One learning client: its data, model, policy and network endpoint."""

    def __init__(
        self,
        pid: int,
        data: ClientData,
        model: nn.Module,
        scratch: nn.Module,
        policy: Policy,
        transport: Transport,
        settings: PeerSettings,
        run: RunDir,
        compute_thread: ComputeThread,
        *,
        seed: int,
        t0: float,
        turns: Turns | None = None,
    ) -> None:
        self.id = pid
        self.data = data
        self.model = model
        self.scratch = scratch  # scores pulled models without touching ``model``
        self.scorer = Scorer(scratch, data.train_x, data.train_y)
        self.policy = policy
        self.transport = transport
        self.settings = settings
        self.run_dir = run
        self.compute_thread = compute_thread  # shared by the peers of this process
        # Async only: the peers of one process take turns to pull and compute (turns.py).
        self.turns = turns
        self.t0 = t0
        self.generator = torch.Generator().manual_seed(seed)
        self.checkpoint = learning.Checkpoint()
        self.state = PeerState()
        self.halt = False  # set by a scenario's kill: stop after the update in progress
        self.resumed_from: int | None = None  # the checkpoint step this peer resumed from
        self._compute_wall = 0.0  # wall time of this update's compute, queueing included
        self.n_samples = int(data.train_y.shape[0])
        self.snapshots = SnapshotMemory()  # this peer's published models take turns in it
        # The model's tensors in one buffer laid out as a data frame: a snapshot is one copy
        # and mixing pulled models one weighted sum per dtype.
        self.flat = FlatModel.adopt(model)
        # The live model's tensors, fetched once: training and load_state_dict change them
        # in place and never replace them, and state_dict() costs a walk of the module tree.
        self.live_state = model.state_dict()
        self._last_checkpoint = -math.inf  # time.monotonic() of the last periodic checkpoint

    # ------------------------------------------------------------------ compute
    async def _compute(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` off the event loop (the loop keeps serving meanwhile)."""
        w = time.perf_counter()
        out, d = await self.compute_thread.run(fn)
        self.state.compute_s += d
        self._compute_wall += time.perf_counter() - w
        return out

    def _train_and_validate(self) -> dict[str, float]:
        train_loss = learning.train(
            self.model, self.data.train_x, self.data.train_y,
            epochs=self.settings.epochs, batch_size=self.settings.batch_size,
            lr=self.settings.lr, generator=self.generator,
        )
        val_loss, val_acc = learning.evaluate(self.model, self.data.val_x, self.data.val_y)
        self.checkpoint.offer(val_loss, self.model, self.state.step)
        return {"train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc}

    def _snapshot(self) -> ModelPayload:
        return ModelPayload.from_frame(
            self.flat.frame(),
            self.flat.layout,
            step=self.state.step,
            version=self.state.version + 1,
            n_samples=self.n_samples,
            scores=self.policy.score_row() if self.policy.publishes_scores else None,
            meta={"t": time.time()},
            memory=self.snapshots,
        )

    async def publish(self) -> None:
        self._install(await self._compute(self._snapshot))

    def _install(self, payload: ModelPayload) -> None:
        """Make ``payload`` the snapshot every later pull is answered with."""
        self.state.version = payload.version
        self.transport.publish(payload)

    def _score(self, replies: list[PullResult]) -> list[float]:
        losses = []
        for r in replies:
            assert r.message is not None
            losses.append(self.scorer.mean_loss_of(r.message))
        return losses

    def _aggregate_train(self, replies: list[PullResult], weights: list[float]) -> dict[str, float]:
        if replies:
            frames = [self.flat.frame()]
            ws = [weights[0]]
            for r, w in zip(replies, weights[1:]):
                if w > 0:  # PENS gives zero weight to models outside its top-n
                    assert r.message is not None
                    frames.append(self.flat.frame_of(r.message))
                    ws.append(w)
            if len(frames) > 1:
                self.flat.mix(frames, ws)
        return self._train_and_validate()

    def _test(self) -> float:
        return learning.accuracy(self.model, self.data.test_x, self.data.test_y)

    # ------------------------------------------------------------------ the loop
    async def warmup(self) -> None:
        """One local training before round 0 (the paper), then publish."""
        if self.settings.warmup:
            await self._compute(self._train_and_validate)
        await self.publish()
        self.state.status = "running"

    async def step(self, turn: Turn | None = None) -> Event:
        """One update of this peer; returns (and logs) its event. With a ``turn``, a slow
        pull lends it out while it waits (see turns.py)."""
        t_start = time.time()
        step = self.state.step
        chosen = self.policy.choose()
        t_pull = time.perf_counter()
        # Values are checked in the compute thread, just before scoring or mixing reads
        # them: the event loop only checks a reply's structure (see wire.check_values).
        pulling = self.transport.start_pulls(chosen, self.settings.pull_timeout_s, check_values=False)
        results = await (pulling.wait() if turn is None else turn.wait_for(pulling))
        pull_s = time.perf_counter() - t_pull
        received = [r for r in results if r.ok and r.message is not None]
        ages, lags = _staleness(received, step)
        # A sender's n_samples is its own claim: capped, so no one peer can swamp the mix.
        cap = max(1, int(self.settings.max_sample_ratio * self.n_samples))
        test_due = bool(self.settings.test_every) and (step + 1) % self.settings.test_every == 0
        limits = self.transport.config.limits

        def update(received: list[PullResult]) -> tuple[
            dict[int, WireError], bool, list[Pulled], list[float], dict[str, float], float | None, ModelPayload
        ]:
            # Check, score, update the weights, aggregate, train, test and snapshot in one
            # trip to the compute thread: each hop costs a wake-up of the event loop.
            refused = _refused_values(received, limits)
            keep = [r for i, r in enumerate(received) if i not in refused]
            scoring = self.policy.scores_models and bool(keep)
            losses = self._score(keep) if scoring else [None] * len(keep)
            pulled = [
                Pulled(r.peer, min(r.message.n_samples, cap), loss, r.message.scores)  # type: ignore[union-attr]
                for r, loss in zip(keep, losses)
            ]
            failed_ids = [r.peer for r in results if not r.ok] + [received[i].peer for i in refused]
            if failed_ids:
                self.policy.pulls_failed(failed_ids)
            self.policy.update(pulled)
            weights = self.policy.mix_weights(self.n_samples, pulled)
            stats = self._aggregate_train(keep, weights)
            self.state.step = step + 1
            test_acc = self._test() if test_due else None
            return refused, scoring, pulled, weights, stats, test_acc, self._snapshot()

        refused, scoring, pulled, weights, stats, test_acc, payload = await self._compute(
            functools.partial(update, received))
        for i, err in refused.items():  # on the loop's thread: it owns the counters
            self.transport.refuse(received[i], err)
        if refused:
            ages = [a for i, a in enumerate(ages) if i not in refused]
            lags = [g for i, g in enumerate(lags) if i not in refused]
        nbytes = sum(r.nbytes for r in received if r.ok)
        failed = {str(r.peer): r.reason for r in results if not r.ok}
        del received, results  # release the received frames
        self.state.last_val_acc = stats["val_acc"]
        if test_acc is not None:
            self.state.last_test_acc = test_acc
        self._install(payload)
        self.state.bytes_pulled += nbytes
        now = time.time()
        event = Event(
            peer=self.id, step=step, t=now - self.t0, dt=now - t_start, pull_s=pull_s, chosen=chosen,
            ok=[p.peer for p in pulled], failed=failed, loss=[p.loss for p in pulled] if scoring else None,
            mix=weights, age_s=ages, lag=lags, bytes=nbytes, train_loss=stats["train_loss"],
            val_loss=stats["val_loss"], val_acc=stats["val_acc"], test_acc=test_acc,
        )
        self.run_dir.append_event(self.id, event)
        self.transport.status["step"] = self.state.step
        ck = self._maybe_checkpoint()
        if ck is not None:
            counters = self.transport.counters.as_dict()  # read here: the loop thread updates them
            await self._compute(lambda: self.save(ck, counters))
        return event

    async def run(
        self, on_event: Callable[[Event], None] | None = None, stop: asyncio.Event | None = None
    ) -> None:
        """The async schedule: update until the budget is spent; no barrier anywhere."""
        s = self.settings
        deadline = None if s.seconds is None else self.t0 + s.seconds

        def over() -> bool:
            return (
                (stop is not None and stop.is_set()) or self.halt
                or (deadline is None and self.state.step >= s.rounds)
                or (deadline is not None and time.time() >= deadline)
            )

        while not over():
            self._compute_wall = 0.0
            if self.turns is None:
                event = await self.step()
            else:
                async with self.turns.turn() as turn:
                    if over():  # killed, stopped or out of time while waiting for the turn
                        break
                    event = await self.step(turn)
            if on_event is not None:
                on_event(event)
            if s.speed > 1.0:
                # Slow hardware: this update's compute takes `speed` times as long. The peer
                # idles (speed - 1) x the wall time its compute took, queueing for the shared
                # compute thread included (so the factor holds however many peers share it);
                # time spent waiting on the network is not multiplied.
                await asyncio.sleep((s.speed - 1.0) * self._compute_wall)

    async def finish(self) -> dict[str, Any]:
        """Final evaluation (best-validation checkpoint and final model); write the result."""
        final_acc = await self._compute(self._test)

        def best() -> float | None:
            if self.checkpoint.best_state is None:
                return None
            self.scratch.load_state_dict(self.checkpoint.best_state)
            return learning.accuracy(self.scratch, self.data.test_x, self.data.test_y)

        best_acc = await self._compute(best)
        if self.state.status != "killed":
            self.state.status = "done"
        if self.settings.checkpoint_every:
            counters = self.transport.counters.as_dict()
            await self._compute(lambda: self.save(self.checkpoint_path, counters, durable=True))
        result = self.result(test_acc=best_acc, final_test_acc=final_acc)
        self.run_dir.write_result(self.id, result)
        return result

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Path, counters: dict[str, Any] | None = None, durable: bool = False) -> None:
        """Write everything needed to resume this peer (atomic; no pickle).

        ``counters``: the transport's counters, read on the event loop's thread (the
        default reads them here, which is only safe when nothing else is running).
        ``durable``: sync it to the disk (the final one; see checkpoint.py)."""
        tensors = {f"model.{k}": v for k, v in self.live_state.items()}
        if self.checkpoint.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in self.checkpoint.best_state.items()})
        tensors["rng.torch"] = self.generator.get_state()
        meta = {
            "peer": self.id,
            "step": self.state.step,
            "state": asdict(self.state),
            "best_loss": self.checkpoint.best_loss,
            "best_step": self.checkpoint.best_step,
            "policy": self.policy.state(),
            "counters": counters if counters is not None else self.transport.counters.as_dict(),
        }
        save_checkpoint(path, tensors, meta, durable=durable)

    def restore(self, path: Path) -> int:
        """Load a checkpoint written by :meth:`save`; return its step."""
        tensors, meta = load_checkpoint(path)
        if meta.get("peer") != self.id:
            raise CheckpointError(f"{path} belongs to peer {meta.get('peer')}, not {self.id}")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best = {k[5:]: v.clone() for k, v in tensors.items() if k.startswith("best.")}
        self.checkpoint.best_state = best or None
        self.checkpoint.best_loss = float(meta["best_loss"])
        self.checkpoint.best_step = int(meta["best_step"])
        self.generator.set_state(tensors["rng.torch"].clone())
        self.policy.restore(meta["policy"])
        self.state = PeerState(**meta["state"])
        self.transport.counters = Counters.from_dict(meta["counters"])
        return self.state.step

    def _maybe_checkpoint(self) -> Path | None:
        every = self.settings.checkpoint_every
        if every and self.state.step % every == 0:
            # A resume redoes at most max(every rounds, checkpoint_min_s) of a peer's work;
            # a peer with rounds of milliseconds would otherwise write many files a second.
            now = time.monotonic()
            if now - self._last_checkpoint >= self.settings.checkpoint_min_s:
                self._last_checkpoint = now
                return self.checkpoint_path
        return None

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir.checkpoint_path(self.id)

    def result(self, **extra: Any) -> dict[str, Any]:
        sw = self.policy.sampling_weights()
        return {
            "peer": self.id,
            "cluster": self.data.cluster,
            "method": self.policy.name,
            "status": self.state.status,
            "steps": self.state.step,
            "best_step": self.checkpoint.best_step,
            "best_val_loss": self.checkpoint.best_loss,
            "compute_s": self.state.compute_s,
            "speed": self.settings.speed,
            "counters": self.transport.counters.as_dict(),
            "sampling_weights": {str(k): v for k, v in sw.items()} if sw else None,
            "resumed_from": self.resumed_from,
            "round0_t": self.t0,  # wall clock of round 0: event times count from here
            **extra,
        }


def _refused_values(received: list[PullResult], limits: Limits) -> dict[int, WireError]:
    """The pulled models whose values ``limits`` refuse (NaN, Inf, too large): their
    index in ``received``, and why."""
    refused: dict[int, WireError] = {}
    for i, r in enumerate(received):
        try:
            check_values(r.message, limits)  # type: ignore[arg-type]
        except WireError as e:
            refused[i] = e
    return refused


def _staleness(replies: list[PullResult], my_step: int) -> tuple[list[float | None], list[int]]:
    """Age of each pulled snapshot (seconds since its sender published it) and its lag
    in steps (my step minus the sender's: positive when the sender is behind me)."""
    now = time.time()
    ages: list[float | None] = []
    lags: list[int] = []
    for r in replies:
        assert r.message is not None
        t = r.message.meta.get("t")  # untrusted: check before use
        ages.append(now - t if isinstance(t, float) and math.isfinite(t) else None)
        lags.append(my_step - r.message.step)
    return ages, lags
