"""The paper-scale presets stay runnable: each one, unchanged but for its size, on small
files in the real CIFAR-10 / IDX formats that the test writes (nothing is downloaded)."""

from __future__ import annotations

import pytest

from _helpers import write_cifar, write_idx_set
from zmqgossip import config, hosting
from zmqgossip.data import DataError

PAPER = ["paper-label-cifar10", "paper-covariate-cifar10", "paper-label-fashion-mnist", "paper-covariate-fashion-mnist"]
# The presets' own settings (model, shift, E, batch, n, tau, schedule) at a tiny size:
# 20 peers x (4 train + 2 validation) images, one round.
TINY = ["peers=20", "rounds=1", "data.n_train=4", "data.n_val=2", "train.epochs=1", "policy.n=3"]


@pytest.mark.parametrize("preset", PAPER)
def test_paper_preset_runs_on_files_in_the_real_format(tmp_path, preset):
    data = tmp_path / "data"
    if "cifar10" in preset:
        write_cifar(data / "cifar-10-batches-py", n=40)  # 200 training, 40 test images
    else:
        write_idx_set(data, n_train=200, n_test=40, gz=True)
    cfg = config.load(preset, [*TINY, f"data.root={data}"])
    assert cfg.data.dataset in ("cifar10", "fashion-mnist") and cfg.train.model in ("cnn32", "cnn28")
    s = hosting.run_experiment(cfg, tmp_path / "run")
    assert s["failed_peers"] == [] and s["peer_rounds"] == 20
    assert s["pulls_ok"] == 20 * 3 and s["test_acc"]["mean"] is not None
    assert len(s["clusters"]) == (2 if "label" in preset else 4)


def test_paper_preset_without_its_folder_says_where_to_put_the_files(tmp_path):
    cfg = config.load("paper-covariate-cifar10", [*TINY, f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(DataError, match="nowhere"):
        hosting.run_experiment(cfg, tmp_path / "run")
