#!/usr/bin/env python
"""The scoring frontier: accuracy against network passes per image, on trained checkpoints.

Stage 1 ("comparators") scores a split with each comparator at the checkpoint's recorded sampler
(the demo's: consistent schedule, 10 DDIM steps from t=901). Stage 2 ("grid") scores it with the
best comparator of stage 1 (or --grid-comparator) at every (DDIM steps S, start_t) of the grid,
plus one_step (the pred_x0 of ONE eps evaluation) at each start_t. Every setting runs on every
checkpoint (independently trained models) with every evaluation seed, on the SAME checkpoints and
images, so differences between settings are paired. Reported per setting: the seven metrics as
mean +- standard deviation over all (checkpoint, seed) runs, the paired difference to the baseline,
network passes per image (SG network + UNet evaluations) and images/s (steady state: the first
batch, which may compile, is left out; the median over runs), then per class, and the frontier:
for each cost, the most accurate setting.

  python benchmarks/bench_sampler.py --checkpoints runs/demo/diad/checkpoints/2250 --random-resnet \\
      --data-dir data_cache --eval-seeds 0 1 2 --out benchmarks/sampler.json --markdown sampler.md
  # a subset of the grid
  python benchmarks/bench_sampler.py ... --stages grid --steps 1 2 5 --start-t 500 300

Stage 3 ("inversion", issue 25) scores the split with the reconstruction-free inversion method at
every (inversion steps, end timestep, image score) of its grid, beside the checkpoint's recorded
sampler (the reference row) and the fast preset; `--round-trip` also reports how far sampling back
from each checkpoint's inverted latents lands from the start latents.

  python benchmarks/bench_sampler.py --checkpoints ... --stages inversion --inversion-steps 1 2 3 5 \
      --inversion-end-t 999 700 500 --inversion-scores pooled nll --round-trip

Writes everything to --out (JSON, one record per run: appended as it goes, so a killed run resumes
where it stopped) and the tables to --markdown.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro")
HEADERS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")


def setting_key(ec) -> str:
    if ec.method == "inversion":
        return (f"inversion S={ec.inversion_steps} end_t={ec.inversion_end_t} score={ec.image_score} "
                f"latent={ec.inversion_latent}")
    one = "one_step" if ec.one_step else f"S={ec.ddim_steps}"
    start = ec.start_t if ec.start_t is not None else f"{ec.schedule}"
    return f"{ec.comparator} {one} start_t={start}"


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", required=True, help="trained checkpoints (independent trainings)")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--data-dir", required=True, help="where the prepared dataset is (or goes)")
    ap.add_argument("--manual-dir", help="raw dataset folder (not for the generated dataset)")
    ap.add_argument("--classes", nargs="+", help="the dataset's classes to score (default: all)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--stages", nargs="+", choices=["comparators", "grid", "inversion"],
                    default=["comparators", "grid"])
    ap.add_argument("--comparators", nargs="+", default=["resnet", "pixel_l1", "ssim", "vae"])
    ap.add_argument("--random-resnet", action="store_true",
                    help="the resnet comparator with a randomly initialised ResNet-50 for checkpoints without one "
                         "(the demo's)")
    ap.add_argument("--grid-comparator", help="default: the best of the comparators stage (I-AUROC + P-AUROC)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    ap.add_argument("--start-t", type=int, nargs="+", default=[999, 700, 500, 300])
    ap.add_argument("--no-one-step", action="store_true", help="leave out the one_step points")
    ap.add_argument("--inversion-steps", type=int, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--inversion-end-t", type=int, nargs="+", default=[999, 700, 500])
    ap.add_argument("--inversion-scores", nargs="+", choices=["pooled", "max", "nll"], default=["pooled", "nll"])
    ap.add_argument("--inversion-latents", nargs="+", choices=["mean", "sample"], default=["mean"])
    ap.add_argument("--round-trip", action="store_true",
                    help="inversion stage: the relative L2 error of inverting then sampling back (first batch)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's evaluation batch")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/sampler.json"))
    ap.add_argument("--markdown", type=Path, help="also write the tables here")
    ap.add_argument("--title", default="", help="a line describing the checkpoints, for the tables")
    ap.add_argument("--report-only", action="store_true", help="only write the tables of the runs in --out")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    import jax

    from diad_jax import cli
    from diad_jax import data as dataio
    from diad_jax.detector import load
    from diad_jax.evaluation import evaluate

    cli.setup_logging()
    jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache" / "diad_jax" / "jax_cache"))
    runs = {k: r for k, r in _read_runs(args.out).items() if r["checkpoint"] in args.checkpoints
            and r["seed"] in args.eval_seeds}
    first = load(args.checkpoints[0], batch_size=args.batch_size)
    prepared = dataio.prepare(args.dataset, args.data_dir, manual_dir=args.manual_dir, classes=args.classes,
                              image_size=first.image_size)
    baseline = first.eval_config  # the recorded sampler (the demo's: consistent, 10 steps)

    def run(ec):
        # inverting the posterior mean draws no noise: every evaluation seed gives the first one's maps
        deterministic = ec.method == "inversion" and ec.inversion_latent == "mean"
        for ck in args.checkpoints:
            for seed in args.eval_seeds:
                key = f"{setting_key(ec)} | {ck} | seed={seed}"
                if key in runs:
                    continue
                first = f"{setting_key(ec)} | {ck} | seed={args.eval_seeds[0]}"
                if deterministic and first in runs:
                    runs[key] = {**runs[first], "seed": seed, "same_as_seed": args.eval_seeds[0]}
                    with open(args.out, "a") as f:
                        f.write(json.dumps({key: runs[key]}) + "\n")
                    continue
                det = load(ck, eval_config=dataclasses.replace(ec, seed=seed), batch_size=args.batch_size,
                           resnet="random" if args.random_resnet else "checkpoint")
                t0 = time.perf_counter()
                result = evaluate(det, prepared, split=args.split, progress=False)
                t = result.timings
                steady = (t["images"] - det.eval_config.batch_size) / max(t["score_s"] - t["first_batch_s"], 1e-9)
                runs[key] = dict(setting=setting_key(ec), checkpoint=ck, seed=seed, eval_config=det.eval_config.to_dict(),
                                 metrics=result.metrics, images_per_s=steady, wall_s=time.perf_counter() - t0)
                with open(args.out, "a") as f:
                    f.write(json.dumps({key: runs[key]}) + "\n")
                m = result.metrics["mean"]
                print(f"{key}: I-AUROC {100 * m['i_auroc']:.1f} P-AUROC {100 * m['p_auroc']:.1f} "
                      f"AUPRO {100 * m['aupro']:.1f}, {steady:.1f} img/s", flush=True)

    comparator_keys = [setting_key(dataclasses.replace(baseline, comparator=c)) for c in args.comparators]
    if "comparators" in args.stages and not args.report_only:
        for comp in args.comparators:
            run(dataclasses.replace(baseline, comparator=comp))
    grid_comp = args.grid_comparator
    if grid_comp is None:
        scored = {k: _mean(runs, k, "i_auroc") + _mean(runs, k, "p_auroc") for k in comparator_keys
                  if _values(runs, k, "i_auroc")}
        grid_comp = max(scored, key=scored.get).split()[0] if scored else baseline.comparator
    ref = dataclasses.replace(baseline, comparator=grid_comp)
    if "grid" in args.stages and not args.report_only:
        run(ref)
        for start in args.start_t:
            points = [dict(ddim_steps=s, one_step=False) for s in args.steps if s <= start]
            if not args.no_one_step:
                points.append(dict(ddim_steps=1, one_step=True))
            for p in points:
                run(dataclasses.replace(ref, schedule="consistent", start_t=start, **p))
    if "inversion" in args.stages and not args.report_only:
        run(baseline)
        run(baseline.fast())
        for steps in args.inversion_steps:
            for end_t in args.inversion_end_t:
                for score in args.inversion_scores:
                    for latent in args.inversion_latents:
                        run(dataclasses.replace(baseline, method="inversion", inversion_steps=steps,
                                                inversion_end_t=end_t, image_score=score, inversion_latent=latent))
    round_trips = _round_trips(args, prepared) if args.round_trip and not args.report_only else []
    # every setting in --out (also from earlier invocations) run on all these checkpoints and seeds
    complete = {k for k in {r["setting"] for r in runs.values()}
                if len(_values(runs, k, "i_auroc")) == len(args.checkpoints) * len(args.eval_seeds)}
    grid_keys = sorted(k for k in complete if k.split()[0] == grid_comp)
    inversion_keys = ([setting_key(baseline), setting_key(baseline.fast())]
                      + sorted((k for k in complete if k.startswith("inversion ")), key=lambda k: (_passes(runs, k), k)))
    tables = _tables(runs, args, [k for k in comparator_keys if k in complete], setting_key(ref), grid_keys,
                     [k for k in inversion_keys if k in complete], round_trips)
    print(tables)
    if args.markdown:
        args.markdown.write_text(tables)


def _round_trips(args, prepared, steps=(3, 10, 50)) -> list[tuple[str, int, float]]:
    """(checkpoint, steps, relative L2 error) of DDIM-inverting the posterior means of the first 8
    test images to t=999 and sampling back through the same timesteps, with each checkpoint's model."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diad_jax.data.pipeline import normalize
    from diad_jax.detector import load
    from diad_jax.diffusion import alphas_cumprod, ddim_invert, ddim_step, inversion_timesteps

    images = normalize(np.stack([np.asarray(prepared[args.split][i]["image"]) for i in range(8)]))
    out = []
    for ck in args.checkpoints:
        det = load(ck)
        scorer, bundle = det.scorer, jax.device_get(det.bundle)
        acp = alphas_cumprod(scorer.diffusion)
        for n in steps:
            ts = inversion_timesteps(999, n)
            down = np.asarray(ts[::-1])  # the sampler's steps through the same timesteps, the last to acp[0]
            plan = (jnp.asarray(down, jnp.int32), jnp.asarray(acp[down], jnp.float32),
                    jnp.asarray(acp[[*down[1:], 0]], jnp.float32))

            @jax.jit
            def round_trip(bundle, images):
                eps_fn = scorer.eps_fn(bundle, images)
                mean, _ = scorer.model.encode_moments(bundle, images)
                z0 = scorer.config.scale_factor * mean

                def back(x, step):
                    t, a_t, a_prev = step
                    return ddim_step(x, eps_fn(x, jnp.full((x.shape[0],), t, jnp.int32)), a_t, a_prev, 0.0)[0], None

                x, _ = jax.lax.scan(back, ddim_invert(scorer.diffusion, eps_fn, z0, ts), plan)
                return jnp.linalg.norm(x - z0) / jnp.linalg.norm(z0)

            out.append((ck, n, float(round_trip(bundle, images))))
            print(f"round trip {ck} S={n}: relative error {out[-1][2]:.4f}", flush=True)
    return out


def _read_runs(path: Path) -> dict:
    runs = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                runs.update(json.loads(line))
    return runs


def _values(runs, setting, metric, cls="mean"):
    return [100 * r["metrics"][cls][metric] for r in runs.values() if r["setting"] == setting]


def _mean(runs, setting, metric, cls="mean"):
    v = _values(runs, setting, metric, cls)
    return statistics.fmean(v) if v else float("nan")


def _paired_delta(runs, setting, ref, metric):
    by_run = {(r["checkpoint"], r["seed"]): 100 * r["metrics"]["mean"][metric]
              for r in runs.values() if r["setting"] == ref}
    d = [100 * r["metrics"]["mean"][metric] - by_run[(r["checkpoint"], r["seed"])]
         for r in runs.values() if r["setting"] == setting and (r["checkpoint"], r["seed"]) in by_run]
    return (statistics.fmean(d), statistics.pstdev(d)) if d else (float("nan"), float("nan"))


def _cell(runs, setting, metric, cls="mean"):
    v = _values(runs, setting, metric, cls)
    return f"{statistics.fmean(v):.1f} ± {statistics.pstdev(v):.1f}" if v else "-"


def _passes(runs, setting):
    ec = next(r["eval_config"] for r in runs.values() if r["setting"] == setting)
    return ec["inversion_steps"] if ec.get("method") == "inversion" else ec["ddim_steps"]


def _speed(runs, setting):
    return statistics.median(r["images_per_s"] for r in runs.values() if r["setting"] == setting)


def _tables(runs, args, comparator_keys, ref_key, grid_keys, inversion_keys=(), round_trips=()) -> str:
    import jax
    n_ck, n_seed = len(args.checkpoints), len(args.eval_seeds)
    lines = [f"Machine: {platform.processor() or platform.machine()}, {jax.device_count()} "
             f"{jax.default_backend()} device(s), jax {jax.__version__}. {args.title}",
             f"Each cell: mean ± standard deviation over {n_ck} checkpoints x {n_seed} evaluation seeds "
             f"({n_ck * n_seed} runs) on the {args.split} split; Δ = paired difference to the reference row "
             f"(same checkpoint and seed), mean ± sd. images/s: steady state, median over the runs. Inverting "
             f"the posterior mean draws no noise, so its runs are scored once per checkpoint and stand for "
             f"every evaluation seed.", ""]
    head = "| setting | passes / image | images/s | " + " | ".join(HEADERS) + " | Δ I-AUROC | Δ P-AUROC |"
    sep = "|---|---:|---:|" + "---:|" * (len(HEADERS) + 2)

    def row(key, ref):
        di, dp = (_paired_delta(runs, key, ref, m) for m in ("i_auroc", "p_auroc"))
        return (f"| {key} | {_passes(runs, key)} | {_speed(runs, key):.1f} | "
                + " | ".join(_cell(runs, key, m) for m in METRICS)
                + f" | {di[0]:+.1f} ± {di[1]:.1f} | {dp[0]:+.1f} ± {dp[1]:.1f} |")

    classes = sorted(c for c in next(iter(runs.values()))["metrics"] if c != "mean")
    if comparator_keys:
        first = comparator_keys[0]
        lines += [f"### Comparators at the recorded sampler (Δ vs {first})", "", head, sep]
        lines += [row(k, first) for k in comparator_keys] + [""]
        lines += _per_class(runs, comparator_keys, classes)
    grid = grid_keys
    if len(grid) > 1:
        lines += [f"### Sampler grid (Δ vs {ref_key})", "", head, sep]
        lines += [row(k, ref_key) for k in sorted(grid, key=lambda k: (_passes(runs, k), k))] + [""]
        lines += _per_class(runs, grid, classes)
        lines += ["### Frontier: the most accurate setting (mean I-AUROC + P-AUROC) at each cost", "",
                  "| passes / image | setting | images/s | I-AUROC | P-AUROC | AUPRO | Δ I-AUROC | Δ P-AUROC |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for passes in sorted({_passes(runs, k) for k in grid}):
            at = [k for k in grid if _passes(runs, k) == passes]
            best = max(at, key=lambda k: _mean(runs, k, "i_auroc") + _mean(runs, k, "p_auroc"))
            di, dp = (_paired_delta(runs, best, ref_key, m) for m in ("i_auroc", "p_auroc"))
            lines.append(f"| {passes} | {best} | {_speed(runs, best):.1f} | {_cell(runs, best, 'i_auroc')} | "
                         f"{_cell(runs, best, 'p_auroc')} | {_cell(runs, best, 'aupro')} | "
                         f"{di[0]:+.1f} ± {di[1]:.1f} | {dp[0]:+.1f} ± {dp[1]:.1f} |")
        lines.append("")
    if len(inversion_keys) > 2:
        first = inversion_keys[0]
        lines += [f"### Inversion vs reconstruction (Δ vs {first})", "", head, sep]
        lines += [row(k, first) for k in inversion_keys] + [""]
        lines += _per_class(runs, inversion_keys, classes)
    if round_trips:
        lines += ["Round trip (posterior means of the first 8 test images inverted to t=999, then sampled back "
                  "through the same timesteps): relative L2 error", "", "| checkpoint | steps | error |",
                  "|---|---:|---:|"]
        lines += [f"| {ck} | {n} | {err:.4f} |" for ck, n, err in round_trips] + [""]
    return "\n".join(lines)


def _per_class(runs, keys, classes) -> list[str]:
    lines = ["Per class, I-AUROC / P-AUROC / AUPRO (means over the runs):", "",
             "| setting | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for k in keys:
        cells = [" / ".join(f"{_mean(runs, k, m, c):.1f}" for m in ("i_auroc", "p_auroc", "aupro")) for c in classes]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines + [""]


if __name__ == "__main__":
    main()
