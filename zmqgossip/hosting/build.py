"""Peers from a config: data partition, models, policies and transports.

Everything a peer needs is derived from the config and the seed, so every worker (a
task group, a process, a roster host) builds the same partition without anything being
shipped to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zmq
import zmq.asyncio

from .. import models
from ..compute import ComputeThread
from ..config import ExperimentConfig
from ..data import LabelPermutation, LabelShift, Partition, Rotation, load_dataset
from ..links import Links
from ..metrics import RunDir
from ..peer import Peer, PeerSettings
from ..policies import make_policy
from ..security import KeyRing, stop_gatekeeper
from ..net import Transport, TransportConfig, preflight
from ..turns import Turns
from ..wire import Limits, schema_of


def make_shift(cfg: ExperimentConfig, num_classes: int) -> LabelShift | LabelPermutation | Rotation:
    """The partitioner a config describes (paper defaults where fractions are omitted)."""
    d = cfg.data
    if d.shift == "label":
        fr = d.fractions or ([0.4, 0.6] if len(d.groups) == 2 else [1.0 / len(d.groups)] * len(d.groups))
        return LabelShift(d.groups, fr)
    if d.shift == "label-random":
        fr = d.fractions or [1.0 / d.clusters] * d.clusters
        return LabelShift.random_groups(len(fr), d.classes_per_cluster, num_classes, fractions=fr, seed=cfg.seed)
    if d.shift == "label-permutation":
        fr = d.fractions or [1.0 / d.clusters] * d.clusters
        return LabelPermutation(fr, seed=cfg.seed, allow_overlap=d.allow_overlap)
    fr = d.fractions or ([0.7, 0.2, 0.05, 0.05] if len(d.angles) == 4 else [1.0 / len(d.angles)] * len(d.angles))
    return Rotation(d.angles, fr, allow_overlap=d.allow_overlap)


def build_partition(cfg: ExperimentConfig) -> Partition:
    """Load the data and split it over the peers; deterministic in ``cfg.seed``."""
    d = cfg.data
    data = load_dataset(d.dataset, d.root, test_per_class=d.test_per_class, seed=cfg.seed)
    return make_shift(cfg, data.num_classes).split(data, cfg.peers, d.n_train, d.n_val, seed=cfg.seed)


def model_name(cfg: ExperimentConfig, part: Partition) -> str:
    return models.default_model_for(part.input_shape) if cfg.train.model == "auto" else cfg.train.model


def check_model(cfg: ExperimentConfig, part: Partition) -> None:
    """Raise ValueError (with the reason) if the configured model cannot take this data."""
    models.build_model(model_name(cfg, part), part.input_shape, part.num_classes)


def peer_settings(cfg: ExperimentConfig, pid: int) -> PeerSettings:
    t = cfg.train
    return PeerSettings(
        epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, warmup=t.warmup, test_every=t.test_every,
        pull_timeout_s=cfg.network.timeout_s,
        speed=cfg.compute.slow_factor if pid in cfg.compute.slow_peers else 1.0,
        rounds=cfg.rounds, seconds=cfg.seconds if cfg.schedule == "async" else None,
        checkpoint_every=t.checkpoint_every, checkpoint_min_s=t.checkpoint_min_s, max_sample_ratio=cfg.policy.max_sample_ratio,
    )


def transport_config(cfg: ExperimentConfig) -> TransportConfig:
    n = cfg.network
    assert n.pool_size is not None  # resolved by ExperimentConfig's validator
    return TransportConfig(pool_size=n.pool_size, timeout_s=n.timeout_s, hwm=n.hwm, limits=Limits(max_abs=n.max_abs),
                           flood_share=n.flood_share)


@dataclass
class Hosted:
    """The peers one process hosts, and what they share."""

    peers: dict[int, Peer]
    ctx: zmq.asyncio.Context
    compute: ComputeThread

    async def close(self) -> None:
        await asyncio.gather(*(p.transport.close() for p in self.peers.values()), return_exceptions=True)
        self.compute.shutdown()
        stop_gatekeeper(self.ctx)  # its ZAP socket would keep term() waiting
        self.ctx.term()


def build_peers(
    cfg: ExperimentConfig,
    part: Partition,
    ids: Sequence[int],
    directory: Mapping[int, str],
    run: RunDir,
    t0: float,
    *,
    links: Links | None = None,
    keyring: KeyRing | None = None,
) -> Hosted:
    """Models, policies and transports for the peers ``ids`` (sockets not yet bound).

    The socket and descriptor budget is applied before the first socket exists. With a
    ``keyring`` (roster ``security = "curve"``) every transport is a CURVE peer.
    """
    ctx = zmq.asyncio.Context()
    assert cfg.network.pool_size is not None
    try:
        preflight(ctx, len(ids), cfg.network.pool_size, cfg.network.transport, secure=keyring is not None)
    except BaseException:
        ctx.term()
        raise
    compute = ComputeThread("compute")
    turns = Turns(cfg.compute.pull_ahead, cfg.compute.pull_hold_s)  # one computes, pull_ahead pull meanwhile
    name = model_name(cfg, part)
    clusters = {i: c for i, c in enumerate(part.clusters)}
    all_ids = list(range(cfg.peers))
    peers: dict[int, Peer] = {}
    schema = None
    tcfg = transport_config(cfg)
    serving: set[str] = set()  # inproc endpoints bound now (in this context, so in this process)
    for pid in ids:
        torch.manual_seed(cfg.seed if cfg.train.same_init else cfg.seed * 100_003 + pid)
        model = models.build_model(name, part.input_shape, part.num_classes)
        scratch = models.build_model(name, part.input_shape, part.num_classes)
        schema = schema or schema_of(model.state_dict())
        policy = make_policy(
            cfg.method, pid, all_ids, n=cfg.policy.n, rng=np.random.default_rng([cfg.seed, pid]),
            clusters=clusters, tau=cfg.policy.tau, similarity_weighted=cfg.policy.similarity_weighted,
            pens_sampled=cfg.policy.pens_sampled, pens_phase1_rounds=cfg.policy.pens_phase1_rounds,
            dac_options=cfg.policy.dac_options(),
        )
        transport = Transport(ctx, pid, directory, config=tcfg, expect=schema, links=links,
                              security=keyring.for_peer(pid) if keyring is not None else None, serving=serving)
        peers[pid] = Peer(
            pid, part.clients[pid], model, scratch, policy, transport, peer_settings(cfg, pid), run, compute,
            seed=cfg.seed * 1_000_003 + pid, t0=t0, turns=turns,
        )
    return Hosted(peers, ctx, compute)
