"""`diad-jax evaluate` (= scripts/evaluate.py) end to end on a saved checkpoint, calibration included."""
import json
import subprocess

import numpy as np

from diad_jax.calibration import Calibration
from diad_jax.checkpoints import default_context, save_model
from diad_jax.configs import EvalConfig
from diad_jax.metrics import METRIC_NAMES, f1_optimal_threshold
from diad_jax.models.diad import DiAD

from tests.conftest import MICRO
from tests.scripts import ENTRY_POINT, run_script


def evaluate_main(argv):
    return run_script("evaluate", argv)


def test_evaluate_cli_writes_table_json_heatmaps_and_thresholds(tmp_path):
    """Through the installed console command, in a subprocess (as a pip user runs it), on the micro
    model (its checkpoint records the scoring footprint scaled to its 32 px)."""
    ckpt = tmp_path / "ckpt"
    save_model(ckpt, config=MICRO, params=DiAD(MICRO).init(seed=3), context=default_context(MICRO), kind="detector",
               metadata={"eval_config": EvalConfig().scaled_footprint(MICRO.image_size).to_dict()})
    out = tmp_path / "eval"
    argv = ["--checkpoint", ckpt, "--data-dir", tmp_path / "data", "--synthetic-train", 2, "--synthetic-test", 4,
            "--limit-per-class", 4, "--batch-size", 4, "--heatmaps", 1, "--variant", "reference", "--out", out,
            "--random-resnet", "--calibrate"]
    proc = subprocess.run([str(ENTRY_POINT), "evaluate", *map(str, argv)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    assert "| **mean** |" in printed and "I-AUROC" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res["metrics"]["mean"]) == set(METRIC_NAMES)
    assert res["variant"] == "reference" and res["info"]["checkpoint"] == str(ckpt)
    classes = {im["class"] for im in res["images"]}
    assert len(res["images"]) == 4 * len(classes)
    labels = [im["label"] for im in res["images"]]
    assert sum(labels) == 2 * len(classes)  # balanced subset: 2 anomalous + 2 good per class
    assert all(np.isfinite(im["score"]) for im in res["images"])
    for c in classes:
        assert 0.5 <= res["metrics"][c]["i_auroc"] <= 1  # the reference variant flips every AUROC below 0.5
        pngs = list((out / "heatmaps" / c).glob("*.png"))
        assert len(pngs) == 1 and "good" not in pngs[0].name  # anomalous images first
    assert (out / "results.md").read_text().count("\n|") >= len(classes) + 2
    assert any("randomly initialised" in n for n in res["info"]["notes"])
    # --calibrate: thresholds stored in the checkpoint, F1-optimal on this labelled split
    cal = Calibration.load(ckpt)
    scores = np.array([im["score"] for im in res["images"]])
    assert cal.image.value == f1_optimal_threshold(scores, labels)[0] and set(cal.per_class) == classes
    assert "thresholds stored in" in printed


def test_evaluate_cli_bad_checkpoint(tmp_path, capsys):
    rc = evaluate_main(["--checkpoint", tmp_path / "missing", "--out", tmp_path / "o"])
    assert rc == 2 and "missing" in capsys.readouterr().err
