"""Evaluation inside a training run: the validation split scored with the run's current weights
through the one evaluation engine (`diad_jax.evaluation.evaluate`, as scripts/evaluate.py), the
metrics logged, and the best checkpoint kept."""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import jax
from jax.sharding import Mesh

from diad_jax import data as data_lib
from diad_jax import sharding as shd
from diad_jax.configs import ModelConfig, TrainConfig
from diad_jax.detector import Detector
from diad_jax.evaluation import evaluate
from diad_jax.scoring import make_bundle, random_resnet
from diad_jax.train.checkpoint import Checkpointer
from diad_jax.train.metrics_log import MetricWriter

log = logging.getLogger(__name__)

Params = dict[str, Any]


def selection_value(results: dict, best_metric: str) -> float:
    """Sum of the named mean metrics ("p_auroc+i_auroc" = the reference's val_acc)."""
    return float(sum(results["mean"][m.strip()] for m in best_metric.split("+")))


class Validator:
    """Scores cfg.validation.split with cfg.eval, logs to `writer` and keeps the best checkpoint in
    `checkpointer`'s best/. `resnet`: the run's placed ResNet-50, saved with the best checkpoint (None:
    the run has none; a random one is then compared with only under validation.resnet="random",
    checked before the run starts)."""

    def __init__(self, cfg: TrainConfig, model_config: ModelConfig, mesh: Mesh, train_dataset, *,
                 resnet: Params | None, writer: MetricWriter, checkpointer: Checkpointer, model_meta: dict,
                 best_value: float = -math.inf):
        self.cfg, self.model_config, self.mesh = cfg, model_config, mesh
        self.writer, self.checkpointer, self.model_meta, self.resnet = writer, checkpointer, model_meta, resnet
        self.best_value = best_value
        v = cfg.validation
        self.comparator_resnet = None  # other comparators and the inversion need none
        if cfg.eval.needs_resnet:
            if resnet is None:
                log.warning("evaluation uses a RANDOM ResNet-50 (validation.resnet = 'random'): anomaly maps compare "
                            "random features")
                host = random_resnet(0)
                resnet = shd.place(host, jax.tree.map(lambda _: shd.replicated(mesh), host))
            self.comparator_resnet = resnet
        self.dataset = data_lib.load_from_directory(v.data_dir) if v.data_dir else train_dataset
        if v.split == "test" and not v.data_dir:
            log.warning("evaluation and best-checkpoint selection use the TEST split (as the reference does); "
                        "numbers of the selected checkpoint are optimistic. Use validation.split / validation.data_dir for "
                        "a separate validation set, or validation.split = None")
        log.info("evaluating on split %r of %s; best checkpoint by %s", v.split, v.data_dir or "the training dataset",
                 v.best_metric)
        self.detector: Detector | None = None  # built on the first evaluation; later ones reuse its programs

    def evaluate(self, params: Params, context) -> dict:
        """The metrics per class and mean of `params` (placed as they are for training: nothing is gathered)."""
        bundle = make_bundle(params, self.comparator_resnet, context)
        if self.detector is None:
            self.detector = Detector(self.model_config, bundle, eval_config=self.cfg.eval, mesh=self.mesh,
                                     source=str(self.checkpointer.directory.parent))
        else:
            self.detector.bundle = bundle
        t0 = time.perf_counter()
        result = evaluate(self.detector, self.dataset, split=self.cfg.validation.split, classes=self.cfg.data.classes,
                          progress=False)
        log.info("evaluation (%s split, %.1fs):\n%s", self.cfg.validation.split, time.perf_counter() - t0,
                 result.table)
        return result.metrics

    def record(self, step: int, results: dict, params: Params, context) -> None:
        """Logs the mean metrics of `results`, and saves `params` to best/ when they beat the best so far."""
        v = self.cfg.validation
        value = selection_value(results, v.best_metric)
        self.writer.write(step, {**results["mean"], "val": value}, kind=f"eval_{v.split}")
        self.writer.flush()
        if value > self.best_value:
            log.info("step %d: new best %s = %.4f (was %.4f); saving to %s", step, v.best_metric, value,
                     self.best_value, self.checkpointer.best.directory)
            self.best_value = value
            self.checkpointer.save_best(step, value, params=params, context=context, resnet=self.resnet,
                                        model_meta=self.model_meta, metrics=results["mean"])

    def __call__(self, step: int, params: Params, context) -> dict:
        results = self.evaluate(params, context)
        self.record(step, results, params, context)
        return results
