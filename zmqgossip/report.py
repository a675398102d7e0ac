"""Tables and plots from run directories (see :mod:`zmqgossip.metrics` for the layout).

Everything here reads only what a run wrote (``summary.json``, ``clusters.json``,
``pulls.json``, ``events/``, ``peers/``), so it works on a finished run, on a partial
run (crash, Ctrl-C: peers without a result are simply missing) and on runs copied from
another machine.

Tables (Rich, and Markdown for docs):

* :func:`summary_table` -- one run: per-cluster accuracy and within-cluster pulls.
* :func:`compare_table` / :func:`compare_markdown` -- several runs, the paper's layout:
  one row per method, one column per cluster.  Runs that differ only by seed are
  aggregated into one row as ``mean ± std`` (sample std, ``ddof=1``).

Plots (PNG, drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas;
pyplot is never imported, so no global backend is switched, no window opens and no
figure is left registered anywhere):

* :func:`write_plots` -- ``RUN/plots/{accuracy,pull_heatmap,weights,within_cluster,staleness}.png``
* :func:`plot_compare` -- mean validation accuracy over steps, one line per compared run.

Helpers other code can reuse: :func:`load_events`, :func:`load_clusters`,
:func:`pull_counts`, :func:`block_diagonal_share`, :func:`cluster_order`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from .metrics import Event, RunDir, pull_matrix, tail_from, within_fraction

__all__ = [
    "PLOT_NAMES",
    "block_diagonal_share",
    "cluster_order",
    "compare_markdown",
    "compare_table",
    "load_clusters",
    "load_events",
    "plot_compare",
    "pull_counts",
    "summary_table",
    "write_plots",
]

PLOT_NAMES = ("accuracy.png", "pull_heatmap.png", "weights.png", "within_cluster.png", "staleness.png")

DASH = "–"
_DPI = 120
# Config keys that do not make two runs different experiments: runs that differ only in
# these are replicates (aggregated into one row by compare_*).
_REPLICATE_KEYS = {
    "seed", "environment", "t0", "description", "data.root", "compute.processes", "compute.threads",
}
# Preferred order of keys that tell apart two runs of one method.
_LABEL_KEYS = ("schedule", "name")


# ====================================================================== loading


def load_events(run_dir: str | Path) -> dict[int, list[Event]]:
    """Every peer's events, ``{peer: [event, ...]}``, read through :class:`RunDir`: a step
    that a resumed peer ran again counts once (its last line), as in ``summary.json``.

    Peers listed in ``clusters.json`` but without an events file (they died before their
    first update) map to an empty list.  A torn last line is skipped.
    """
    return RunDir.reader(run_dir).all_events()


def load_clusters(run_dir: str | Path) -> tuple[list[int], list[str]]:
    """True cluster id per peer and the clusters' names (``clusters.json``)."""
    clusters, names = RunDir.reader(run_dir).clusters()
    return [int(c) for c in clusters], [str(n) for n in names]


def _load_results(run_dir: Path) -> dict[int, dict]:
    return RunDir.reader(run_dir).results()


def _tail_from(run_dir: Path, events: Mapping[int, Sequence[Event]] | None = None) -> int:
    """First step of the last 20% (as summarize() computes it)."""
    d = RunDir.reader(run_dir).pulls()
    if d is not None:
        if "tail_from_step" in d:
            return int(d["tail_from_step"])
    rounds = 0
    if (run_dir / "config.json").is_file():
        rounds = int(RunDir.reader(run_dir).config().get("rounds") or 0)
    return tail_from(rounds, load_events(run_dir) if events is None else events)


def pull_counts(run_dir: str | Path, *, tail: bool = False) -> np.ndarray:
    """Pull-count matrix ``m[i, j]`` = successful pulls of j's model by i, in peer-id order.

    From ``pulls.json`` (``counts``, or ``tail_counts`` with ``tail=True``: the last 20%
    of steps); rebuilt from the event files when ``pulls.json`` is missing (partial run).
    """
    root = Path(run_dir)
    d = RunDir.reader(root).pulls()
    if d is not None:
        key = "tail_counts" if tail else "counts"
        if key in d:
            return np.asarray(d[key], dtype=np.int64)
    clusters, _ = load_clusters(root)
    events = load_events(root)
    return pull_matrix(events, len(clusters), min_step=_tail_from(root, events) if tail else 0)


def block_diagonal_share(run_dir: str | Path, *, tail: bool = False) -> float:
    """Share of successful pulls that stayed inside the puller's true cluster.

    The mass on the block diagonal of the pull heatmap; ``tail=True`` counts only the
    last 20% of steps.  NaN when there were no pulls (e.g. the local method).
    """
    m = pull_counts(run_dir, tail=tail)
    clusters, _ = load_clusters(run_dir)
    f = within_fraction(m, clusters)
    return float("nan") if f is None else f


def cluster_order(clusters: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Peer ids sorted by true cluster (stable), and the block boundaries in that order
    (the index where each cluster after the first begins)."""
    c = np.asarray(clusters)
    order = np.argsort(c, kind="stable")
    sizes = [int((c == k).sum()) for k in sorted(set(c.tolist()))]
    return order, [int(x) for x in np.cumsum(sizes)[:-1]]


def chance_within(clusters: Sequence[int]) -> float | None:
    """Within-cluster pull fraction of uniform random choice among all other peers."""
    c = np.asarray(clusters)
    n = len(c)
    if n < 2:
        return None
    sizes = np.array([(c == k).sum() for k in set(c.tolist())], dtype=float)
    return float((sizes * (sizes - 1)).sum() / (n * (n - 1)))


# ====================================================================== formatting


def _pct(x: float | None) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _bytes(n: float | None) -> str:
    if n is None:
        return DASH
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return DASH  # pragma: no cover


def _duration(s: float | None) -> str:
    if s is None:
        return DASH
    if s < 120:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 120:
        return f"{m} min {sec} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


def _get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...`` or None when any level is missing or None."""
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


# ====================================================================== one run: table


def summary_table(summary: Mapping[str, Any]) -> Table:
    """One run's result: a row per cluster, a footer row for all peers, and a caption
    with the run's totals.  Accuracies are test accuracy of each peer's
    best-validation checkpoint (and of its final model), averaged over the cluster."""
    title = " · ".join(
        str(x) for x in (
            summary.get("name"), summary.get("method"), summary.get("schedule"),
            f"{summary.get('peers', '?')} peers",
            f"{summary['rounds']} rounds" if summary.get("rounds") else None,
            f"seed {summary['seed']}" if summary.get("seed") is not None else None,
        ) if x is not None
    )
    within = summary.get("within_cluster_pull_fraction") or {}
    # Narrow enough for an 80-column terminal: the column groups are named in the
    # caption instead of in long headers.
    t = Table(title=title, show_footer=True, caption_justify="left")
    t.add_column("cluster", footer="all")
    t.add_column("peers", justify="right", footer=str(summary.get("peers", "")))
    t.add_column("acc\nbest val", justify="right", footer=_pct(_get(summary, "test_acc", "mean")))
    t.add_column("acc\nfinal", justify="right", footer=_pct(_get(summary, "final_test_acc", "mean")))
    t.add_column("within\nall", justify="right", footer=_pct(within.get("all")))
    t.add_column("within\nlast 20%", justify="right", footer=_pct(within.get("last_20pct")))
    clusters = summary.get("clusters") or {}
    for cid in sorted(clusters, key=lambda k: (len(str(k)), str(k))):
        info = clusters[cid] or {}
        t.add_row(
            f"{cid}: {info.get('name', '')}", str(info.get("peers", "")),
            _pct(_get(summary, "test_acc", "per_cluster", cid)),
            _pct(_get(summary, "final_test_acc", "per_cluster", cid)),
            _pct(_get(within, "per_cluster", cid, "all")),
            _pct(_get(within, "per_cluster", cid, "last_20pct")),
        )
    lines = [
        "acc: test accuracy, best-validation checkpoint / final model",
        "within: share of pulls inside the puller's true cluster",
        f"mean test accuracy {_pct(_get(summary, 'test_acc', 'mean'))} (best val), "
        f"{_pct(_get(summary, 'final_test_acc', 'mean'))} (final)",
        f"pulls {summary.get('pulls_ok', 0)} ok / {summary.get('pulls_failed', 0)} failed · "
        f"{_bytes(summary.get('bytes_sent'))} sent · {summary.get('peer_rounds', 0)} peer-rounds · "
        f"wall {_duration(summary.get('wall_s'))}",
    ]
    st = summary.get("staleness") or {}
    if st.get("age_s_p50") is not None:
        lines.append(
            f"pulled models: age p50 {st['age_s_p50']:.2g} s, p99 {st['age_s_p99']:.2g} s · "
            f"lag p50 {st['lag_p50']:.3g}, p99 {st['lag_p99']:.3g} steps"
        )
    ln = summary.get("links")
    if ln and ln.get("messages"):
        mean = ln.get("delay_mean_ms")
        lines.append(
            f"links: {ln['messages']} messages, {ln['dropped']} lost, {ln['partitioned']} cut by partitions, "
            f"{ln['duplicated']} duplicated · delay mean {mean:.3g} ms, p99 {ln.get('delay_p99_ms') or 0:.3g} ms"
            if mean is not None else f"links: {ln['messages']} messages, {ln['dropped']} lost, "
            f"{ln['partitioned']} cut by partitions"
        )
    failed = summary.get("failed_peers") or []
    if failed:
        shown = ", ".join(map(str, failed[:20])) + (", …" if len(failed) > 20 else "")
        lines.append(f"[red]{len(failed)} peer(s) did not finish: {shown}[/red]")
    t.caption = "\n".join(lines)
    return t


# ====================================================================== one run: plots


def _new_figure(w: float, h: float) -> Figure:
    # matplotlib is imported when a plot is drawn: a run that only prints its table
    # (every `zmqgossip run`, at its end) does not pay for it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    fig.clear()
    return path


def _by_step(evs_by_peer: Iterable[Sequence[Event]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over peers of the event field ``key`` at each step (steps where any peer has it)."""
    vals: dict[int, list[float]] = {}
    for evs in evs_by_peer:
        for e in evs:
            v = getattr(e, key)
            if v is not None and e.step >= 0:
                vals.setdefault(e.step, []).append(float(v))
    steps = np.array(sorted(vals), dtype=float)
    mean = np.array([np.mean(vals[int(s)]) for s in steps])
    std = np.array([np.std(vals[int(s)]) for s in steps])
    return steps, mean, std


def _cluster_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _interp(n: int) -> str:
    """Crisp cells for a matrix the figure can show pixel for pixel; smoothed when a
    thousand peers must be shrunk (nearest-neighbour would drop rows at random)."""
    return "nearest" if n <= 300 else "antialiased"


def _block_axes(ax: Any, clusters: Sequence[int], names: Sequence[str]) -> None:
    """Cluster boundaries and cluster-name ticks on a peer x peer matrix ordered by cluster."""
    order, bounds = cluster_order(clusters)
    n = len(order)
    for b in bounds:
        ax.axhline(b - 0.5, color="red", lw=1.2)
        ax.axvline(b - 0.5, color="red", lw=1.2)
    edges = [0, *bounds, n]
    centres = [(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:])]
    ids = sorted(set(clusters))
    labels = [_short(names[c]) if c < len(names) else str(c) for c in ids]
    ax.set_xticks(centres, labels, rotation=30 if len(ids) > 2 else 0, ha="right" if len(ids) > 2 else "center")
    ax.set_yticks(centres, labels, rotation=90, va="center")


def _plot_accuracy(path: Path, title: str, events: Mapping[int, list[Event]], clusters: Sequence[int], names: Sequence[str]) -> Path | None:
    if not any(e.val_acc is not None for evs in events.values() for e in evs):
        return None
    fig = _new_figure(8, 4.8)
    ax = fig.add_subplot()
    ids = sorted(set(clusters))
    colors = _cluster_colors(len(ids))
    for k, c in enumerate(ids):
        members = [events.get(i, []) for i in range(len(clusters)) if clusters[i] == c]
        name = _short(names[c]) if c < len(names) else str(c)
        s, m, sd = _by_step(members, "val_acc")
        if len(s):
            ax.plot(s, m, color=colors[k], lw=1.8, label=f"{name}: validation")
            ax.fill_between(s, np.clip(m - sd, 0, 1), np.clip(m + sd, 0, 1), color=colors[k], alpha=0.15, lw=0)
        s, m, _ = _by_step(members, "test_acc")
        if len(s):
            ax.plot(s, m, ls="none", marker="o", ms=5, mec="black", mew=0.6, color=colors[k], label=f"{name}: test")
    ax.set_xlabel("step (updates of each peer)")
    ax.set_ylabel("accuracy (mean over the cluster's peers)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}\naccuracy per true cluster (band: ± std over peers)")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def _plot_heatmap(path: Path, title: str, run_dir: Path, clusters: Sequence[int], names: Sequence[str], tail_from: int) -> Path | None:
    m_all = pull_counts(run_dir)
    if m_all.sum() == 0:
        return None
    m_tail = pull_counts(run_dir, tail=True)
    panels = [("all steps", m_all)]
    if m_tail.sum() > 0:
        panels.append((f"last 20% (steps ≥ {tail_from})", m_tail))
    order, _ = cluster_order(clusters)
    fig = _new_figure(6.2 * len(panels), 5.6)
    for k, (label, m) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        mo = m[np.ix_(order, order)]
        im = ax.imshow(mo, cmap="viridis", interpolation=_interp(len(order)), vmin=0)
        _block_axes(ax, clusters, names)
        share = within_fraction(m, clusters)
        ax.set_title(f"{label}: {_pct(share)} within cluster")
        ax.set_xlabel("pulled peer (ordered by true cluster)")
        ax.set_ylabel("pulling peer (ordered by true cluster)")
        cb = fig.colorbar(im, ax=ax, shrink=0.85, label="successful pulls")
        from matplotlib.ticker import MaxNLocator

        cb.locator = MaxNLocator(integer=True)
        cb.update_ticks()
    fig.suptitle(f"{title}: who pulled whom")
    return _save(fig, path)


def _plot_weights(path: Path, title: str, results: Mapping[int, dict], clusters: Sequence[int], names: Sequence[str]) -> Path | None:
    n = len(clusters)
    rows = {i: r.get("sampling_weights") for i, r in results.items() if r.get("sampling_weights")}
    if not rows:
        return None
    w = np.full((n, n), np.nan)
    for i, sw in rows.items():
        if 0 <= i < n:
            w[i, :] = 0.0
            for j, v in sw.items():
                j = int(j)
                if 0 <= j < n and v is not None:
                    w[i, j] = float(v)
    order, _ = cluster_order(clusters)
    wo = w[np.ix_(order, order)]
    fig = _new_figure(6.6, 5.6)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["magma"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(wo), cmap=cmap, interpolation=_interp(n), vmin=0)
    _block_axes(ax, clusters, names)
    mass = np.nansum(np.where(np.asarray(clusters)[:, None] == np.asarray(clusters)[None, :], w, 0.0)) / max(np.nansum(w), 1e-300)
    ax.set_title(f"{title}: final sampling weights $p_{{ij}}$\n{_pct(mass)} of the mass within cluster"
                 + (f"; grey: no result ({n - len(rows)} peers)" if len(rows) < n else ""))
    ax.set_xlabel("peer j (ordered by true cluster)")
    ax.set_ylabel("peer i (ordered by true cluster)")
    fig.colorbar(im, ax=ax, shrink=0.85, label="probability that i pulls j")
    return _save(fig, path)


def _within_by_step(events: Mapping[int, list[Event]], clusters: Sequence[int], rows: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    c = list(clusters)
    inside: dict[int, int] = {}
    total: dict[int, int] = {}
    for i in (events if rows is None else rows):
        for e in events.get(i, []):
            ok = e.ok
            if not ok or e.step < 0:
                continue
            s = e.step
            total[s] = total.get(s, 0) + len(ok)
            inside[s] = inside.get(s, 0) + sum(1 for j in ok if 0 <= j < len(c) and c[j] == c[i])
    steps = np.array(sorted(total), dtype=float)
    return steps, np.array([inside[int(s)] / total[int(s)] for s in steps])


def _plot_within(path: Path, title: str, events: Mapping[int, list[Event]], clusters: Sequence[int], names: Sequence[str], tail_from: int) -> Path | None:
    s, f = _within_by_step(events, clusters)
    if not len(s):
        return None
    fig = _new_figure(8, 4.8)
    ax = fig.add_subplot()
    ax.plot(s, f, color="black", lw=2.2, label="all peers")
    ids = sorted(set(clusters))
    colors = _cluster_colors(len(ids))
    for k, c in enumerate(ids):
        rows = [i for i in range(len(clusters)) if clusters[i] == c]
        sc, fc = _within_by_step(events, clusters, rows)
        if len(sc):
            ax.plot(sc, fc, color=colors[k], lw=1.4, label=_short(names[c]) if c < len(names) else str(c))
    chance = chance_within(clusters)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"uniform choice ({_pct(chance)})")
    if 0 < tail_from <= s.max():
        ax.axvspan(tail_from - 0.5, s.max() + 0.5, color="grey", alpha=0.1, lw=0, label="last 20%")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("step (updates of each peer)")
    ax.set_ylabel("share of pulls inside the puller's cluster")
    ax.set_title(f"{title}\nwithin-cluster pull fraction per step")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def _plot_staleness(path: Path, title: str, events: Mapping[int, list[Event]]) -> Path | None:
    ages = [float(a) for evs in events.values() for e in evs for a in e.age_s if a is not None]
    lags = [int(a) for evs in events.values() for e in evs for a in e.lag if a is not None]
    if not ages and not lags:
        return None
    fig = _new_figure(10, 4.2)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if ages:
        ax1.hist(ages, bins=min(50, max(10, len(ages) // 20)), color="tab:blue", edgecolor="white", lw=0.3)
        ax1.set_title(f"age: p50 {np.percentile(ages, 50):.3g} s, p99 {np.percentile(ages, 99):.3g} s")
    else:
        ax1.text(0.5, 0.5, "no ages recorded", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_xlabel("age of pulled snapshot (s since its sender published it)")
    ax1.set_ylabel("pulled models")
    if lags:
        lo, hi = min(lags), max(lags)
        width = max(1, (hi - lo + 1) // 60)  # one bar per step of lag, up to 60 bars
        ax2.hist(lags, bins=np.arange(lo - 0.5, hi + width + 0.5, width), rwidth=0.85, color="tab:orange")
        from matplotlib.ticker import MaxNLocator

        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_title(f"lag: p50 {np.percentile(lags, 50):g}, p99 {np.percentile(lags, 99):g} steps")
    ax2.set_xlabel("lag (puller's step − sender's step; < 0: sender ahead)")
    ax2.set_ylabel("pulled models")
    fig.suptitle(f"{title}: staleness of pulled models")
    return _save(fig, path)


def write_plots(run_dir: str | Path) -> list[Path]:
    """Write the run's PNGs into ``RUN/plots`` and return the paths written.

    ``accuracy.png`` validation accuracy per step (mean per cluster, test accuracy as
    points); ``pull_heatmap.png`` pull counts ordered by true cluster (all steps and the
    last 20%); ``weights.png`` final soft sampling weights (methods that have them: DAC);
    ``within_cluster.png`` within-cluster pull fraction per step; ``staleness.png``
    age and lag of pulled models.  A plot with nothing to show (no pulls for the local
    method, no weights for random gossip) is not written, and a stale copy of it from
    an earlier report is removed, so the folder always matches the returned list.
    """
    root = Path(run_dir)
    clusters, names = load_clusters(root)
    events = load_events(root)
    results = _load_results(root)
    cfg = RunDir.reader(root).config() if (root / "config.json").is_file() else {}
    title = " · ".join(str(x) for x in (cfg.get("name"), cfg.get("method"), cfg.get("schedule")) if x)
    tail_from = _tail_from(root, events)
    out_dir = root / "plots"
    out_dir.mkdir(exist_ok=True)
    makers = {
        "accuracy.png": lambda p: _plot_accuracy(p, title, events, clusters, names),
        "pull_heatmap.png": lambda p: _plot_heatmap(p, title, root, clusters, names, tail_from),
        "weights.png": lambda p: _plot_weights(p, title, results, clusters, names),
        "within_cluster.png": lambda p: _plot_within(p, title, events, clusters, names, tail_from),
        "staleness.png": lambda p: _plot_staleness(p, title, events),
    }
    written = []
    for name, make in makers.items():
        p = out_dir / name
        if make(p) is not None:
            written.append(p)
        else:
            p.unlink(missing_ok=True)
    return written


# ====================================================================== several runs


@dataclass
class _Run:
    path: Path
    summary: dict
    config: dict  # flattened, replicate keys removed


@dataclass
class _Group:
    runs: list[_Run] = field(default_factory=list)
    label: str = ""

    @property
    def method(self) -> str:
        return str(self.runs[0].summary.get("method") or self.runs[0].config.get("method") or "?")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _load_run(path: str | Path) -> _Run:
    root = Path(path)
    rd = RunDir.reader(root)
    summary = rd.summary()
    cfg_path = root / "config.json"
    if cfg_path.is_file():
        flat = _flatten(rd.config())
    else:
        flat = {k: summary.get(k) for k in ("name", "method", "schedule", "peers", "rounds")}
    flat = {k: v for k, v in flat.items() if k not in _REPLICATE_KEYS and not k.startswith("environment.")}
    return _Run(root, summary, flat)


def _key(run: _Run) -> str:
    return json.dumps(run.config, sort_keys=True, default=str)


def _groups(run_dirs: Sequence[str | Path]) -> list[_Group]:
    """Runs grouped into replicates (same config but for the seed), in first-seen order,
    each with a label: the method, plus what sets it apart from other rows of that method."""
    groups: dict[str, _Group] = {}
    for d in run_dirs:
        r = _load_run(d)
        groups.setdefault(_key(r), _Group()).runs.append(r)
    gs = list(groups.values())
    by_method: dict[str, list[_Group]] = {}
    for g in gs:
        by_method.setdefault(g.method, []).append(g)
    for method, same in by_method.items():
        if len(same) == 1:
            same[0].label = method
            continue
        keys = sorted({k for g in same for k in g.runs[0].config} - {"method"})
        differing = [k for k in keys if len({json.dumps(g.runs[0].config.get(k), default=str) for g in same}) > 1]
        # schedule, then name, then top-level keys (peers, rounds, ...), then nested ones
        differing.sort(key=lambda k: (_LABEL_KEYS.index(k) if k in _LABEL_KEYS else len(_LABEL_KEYS), k.count("."), k))
        for g in same:
            parts = []
            for k in differing[:2]:
                v = g.runs[0].config.get(k)
                parts.append(str(v) if k in _LABEL_KEYS else f"{k}={v}")
            if len(differing) > 2:
                parts.append("…")
            g.label = f"{method} ({', '.join(parts)})" if parts else method
        seen: dict[str, int] = {}
        for g in same:  # still equal (only possible when the differences were cut off)
            seen[g.label] = seen.get(g.label, 0) + 1
            if seen[g.label] > 1:
                g.label += f" #{seen[g.label]}"
    for g in gs:
        if len(g.runs) > 1:
            seeds = {r.summary.get("seed") for r in g.runs}
            g.label += f" [{len(g.runs)} {'seeds' if len(seeds) == len(g.runs) else 'runs'}]"
    return gs


def _cell(values: Iterable[float | None]) -> str:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return DASH
    if len(v) == 1:
        return f"{100 * v[0]:.1f}"
    return f"{100 * np.mean(v):.1f} ± {100 * np.std(v, ddof=1):.1f}"


def _compare_rows(run_dirs: Sequence[str | Path]) -> tuple[list[str], list[list[str]]]:
    groups = _groups(run_dirs)
    cluster_names: list[str] = []  # columns: every cluster name, in first-seen order
    for g in groups:
        for r in g.runs:
            cl = r.summary.get("clusters") or {}
            for cid in sorted(cl, key=lambda k: (len(str(k)), str(k))):
                name = str((cl[cid] or {}).get("name", cid))
                if name not in cluster_names:
                    cluster_names.append(name)
    header = ["run", *cluster_names, "mean", "within (all)", "within (last 20%)"]
    rows = []
    for g in groups:
        row = [g.label]
        for name in cluster_names:
            vals = []
            for r in g.runs:
                cl = r.summary.get("clusters") or {}
                ids = [cid for cid, info in cl.items() if str((info or {}).get("name", cid)) == name]
                vals.append(_get(r.summary, "test_acc", "per_cluster", ids[0]) if ids else None)
            row.append(_cell(vals))
        row.append(_cell(_get(r.summary, "test_acc", "mean") for r in g.runs))
        row.append(_cell(_get(r.summary, "within_cluster_pull_fraction", "all") for r in g.runs))
        row.append(_cell(_get(r.summary, "within_cluster_pull_fraction", "last_20pct") for r in g.runs))
        rows.append(row)
    return header, rows


_COMPARE_NOTE = (
    "Test accuracy (%) of each peer's best-validation checkpoint, averaged per true cluster "
    "and over all peers; within: share (%) of successful pulls inside the "
    "puller's true cluster, over all steps and over the last 20% of steps. "
    "a ± b: mean ± sample std over seeds."
)


def compare_table(run_dirs: Sequence[str | Path]) -> Table:
    """Runs side by side: a row per method (seeds aggregated), a column per cluster."""
    header, rows = _compare_rows(run_dirs)
    t = Table(title="Test accuracy (%), best-validation checkpoint", caption=_COMPARE_NOTE, caption_justify="left")
    # On a narrow terminal the figures wrap; the run's name keeps room to be read.
    t.add_column(header[0], justify="left", overflow="fold", min_width=min(16, max((len(r[0]) for r in rows), default=0)))
    for h in header[1:]:
        t.add_column(h, justify="right", overflow="fold")
    for r in rows:
        t.add_row(*r)
    return t


def compare_markdown(run_dirs: Sequence[str | Path]) -> str:
    """The compare table as GitHub Markdown (for docs), with a one-line note below."""
    header, rows = _compare_rows(run_dirs)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join([":---", *(["---:"] * (len(header) - 1))]) + "|",
        *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows),
    ]
    return "\n".join(lines) + "\n\n" + _COMPARE_NOTE + "\n"


def plot_compare(run_dirs: Sequence[str | Path], path: str | Path, *, metric: str = "val_acc") -> Path:
    """One line per row of the compare table (a run, or the mean of its seeds with a ± std
    band) over steps: ``metric="val_acc"`` the mean validation accuracy over peers,
    ``metric="within"`` the share of that step's pulls inside the puller's true cluster
    (rows with no pulls, like the local method, have no line)."""
    if metric not in ("val_acc", "within"):
        raise ValueError(f"metric must be 'val_acc' or 'within', got {metric!r}")
    fig = _new_figure(8, 4.8)
    ax = fig.add_subplot()
    groups = _groups(run_dirs)
    colors = _cluster_colors(len(groups))
    for k, g in enumerate(groups):
        curves = []
        for r in g.runs:
            if metric == "within":
                clusters, _ = load_clusters(r.path)
                s, m = _within_by_step(load_events(r.path), clusters)
            else:
                s, m, _ = _by_step(load_events(r.path).values(), "val_acc")
            curves.append(dict(zip(s.tolist(), m.tolist())))
        steps = sorted(set().union(*curves))
        if not steps:
            continue
        per = [[c[s] for c in curves if s in c] for s in steps]
        mean = np.array([np.mean(v) for v in per])
        ax.plot(steps, mean, color=colors[k], lw=1.8, label=g.label)
        if len(g.runs) > 1:
            sd = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per])
            ax.fill_between(steps, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=colors[k], alpha=0.15, lw=0)
    ax.set_xlabel("step (updates of each peer)")
    if metric == "within":
        ax.set_ylabel("share of pulls inside the true cluster")
        ax.set_title("Within-cluster pull fraction over steps")
    else:
        ax.set_ylabel("validation accuracy (mean over peers)")
        ax.set_title("Validation accuracy over steps")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)
