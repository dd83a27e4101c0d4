"""The nested TrainConfig: sections, serialisation (also of the flat names of older versions), the
one mapping of command-line flags onto fields, --print-config, and the orbax tuning training relies on."""
from __future__ import annotations

import json
import logging

import jax
import orbax.checkpoint as ocp
import pytest

from diad_jax import cli
from diad_jax.cli.flags import RUNTIME_FLAGS
from diad_jax.configs import (FLAT_TRAIN_FIELDS, DataConfig, EvalConfig, OptimizerConfig, TrainConfig,
                              unflatten_train_dict)
from diad_jax.errors import ConfigError
from diad_jax.train import tune_orbax_array_handler
from diad_jax.train.checkpoint import REPLICA_PARALLEL_MIN_BYTES, check_resume_compatible
from tests.scripts import load_script


def _paths(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _paths(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "options" else {prefix + k}
    return out


def test_sections_round_trip_and_replace_by_dotted_path():
    cfg = TrainConfig.tiny(steps=5, **{"optimizer.learning_rate": 3e-4, "eval.comparator": "ssim"})
    assert isinstance(cfg.optimizer, OptimizerConfig) and isinstance(cfg.data, DataConfig)
    assert isinstance(cfg.eval, EvalConfig)
    assert (cfg.steps, cfg.optimizer.learning_rate, cfg.eval.comparator) == (5, 3e-4, "ssim")
    assert cfg.data.options == {"train_per_class": 24, "test_per_class": 8}  # the preset's section kept
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match=r"TrainConfig.optimizer: unknown keys \['lr'\]"):
        TrainConfig.from_dict({"optimizer": {"lr": 1.0}})
    with pytest.raises(ConfigError, match=r"TrainConfig: unknown keys \['bogus'\].*; TrainConfig.optimizer: unknown "
                                          r"keys \['lr'\].*; TrainConfig.data: unknown keys \['batch'\]"):
        TrainConfig.from_dict({"bogus": 1, "optimizer": {"lr": 1.0}, "data": {"batch": 2}})  # every one named
    with pytest.raises(ConfigError, match=r"^optimizer.b1 must be in \[0, 1\)") as e:
        cfg.replace(**{"optimizer.b1": 1.5})
    assert e.value.fields == ("optimizer.b1",)


def test_errors_name_fields_by_their_path_in_the_config_that_holds_them():
    with pytest.raises(ConfigError) as e:
        EvalConfig(sigma=-1)
    assert (str(e.value), e.value.fields) == ("sigma must be > 0, got -1", ("sigma",))
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"eval": {"sigma": -1}})
    assert (str(e.value), e.value.fields) == ("eval.sigma must be > 0, got -1", ("eval.sigma",))
    with pytest.raises(ConfigError) as e:  # the sampler's check, named by EvalConfig's field
        TrainConfig.from_dict({"eval": {"eta": -0.5}})
    assert e.value.fields == ("eval.eta",)
    with pytest.raises(ConfigError) as e:  # a cross-section check names every field involved
        TrainConfig.from_dict({"train_t_max": 2000, "diffusion": {"num_train_timesteps": 1000}})
    assert e.value.fields == ("train_t_max", "diffusion.num_train_timesteps")
    with pytest.raises(ConfigError) as e:
        TrainConfig.tiny(**{"data.batch_size": 0})
    assert str(e.value).startswith("data.batch_size must be >= 1") and e.value.fields == ("data.batch_size",)
    # the inversion's plan and its own image score (issue 25)
    for bad, fields in (({"inversion_end_t": 1000}, ("eval.inversion_end_t",)),
                        ({"inversion_steps": 6, "inversion_end_t": 5}, ("eval.inversion_steps", "eval.inversion_end_t")),
                        ({"image_score": "nll"}, ("eval.image_score", "eval.method=inversion")),
                        ({"method": "invert"}, ("eval.method",))):
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_dict({"eval": bad})
        assert e.value.fields == fields, bad
    assert EvalConfig(method="inversion", image_score="nll", inversion_steps=5, inversion_end_t=5).image_score == "nll"


def test_flat_names_of_older_versions_are_read_and_named(caplog):
    """Every flat name maps onto a field that exists; a flat config (an older checkpoint's
    train_config, an older --config file) is read where old files are read, with a warning naming
    where each name lives now; TrainConfig.from_dict reads the nested form only."""
    fields = _paths(TrainConfig().to_dict())
    assert set(FLAT_TRAIN_FIELDS.values()) <= fields
    flat = {"learning_rate": 2e-4, "eval_every": 5, "dataset_options": {"train_per_class": 3}, "eval_sigma": 1.5,
            "async_checkpoint": False, "kl_weight": 0.5, "steps": 7}
    with caplog.at_level(logging.WARNING):
        nested, moved = unflatten_train_dict(flat, "old.json")
    assert "old.json uses the flat TrainConfig names" in caplog.text
    assert "learning_rate -> optimizer.learning_rate" in caplog.text and moved["eval_sigma"] == "eval.sigma"
    cfg = TrainConfig.from_dict(nested)
    assert (cfg.optimizer.learning_rate, cfg.validation.every, cfg.data.options, cfg.eval.sigma,
            cfg.checkpoint.async_save, cfg.autoencoder.kl_weight, cfg.steps) == (2e-4, 5, {"train_per_class": 3},
                                                                                1.5, False, 0.5, 7)
    with pytest.raises(ConfigError, match=r"TrainConfig: unknown keys \['async_checkpoint', 'dataset_options'"):
        TrainConfig.from_dict(flat)


def test_a_checkpoint_train_config_with_flat_names_is_read_when_resuming(caplog):
    """The resume check reads an older checkpoint's flat train_config item (and says so)."""
    run = TrainConfig.tiny()
    with caplog.at_level(logging.WARNING):
        check_resume_compatible({"learning_rate": 2e-4, "grad_accum": 1, "trainable": "reference"}, run, "ckpt/5")
    assert "ckpt/5: train_config uses the flat TrainConfig names" in caplog.text
    assert ("resuming ckpt/5 with optimizer.learning_rate = 0.0001 (the checkpoint's run used 0.0002)"
            in caplog.text)


@pytest.mark.parametrize("script", ["train", "finetune_autoencoder"])
def test_every_flag_sets_one_existing_field(script):
    """The flags' dests are the fields' dotted paths (the one mapping); each flag given lands there."""
    ap = load_script(script).build_parser()
    fields = _paths(TrainConfig().to_dict())
    field_flags = {dest: flag for dest, (flag, _) in ap.flags.items() if dest not in RUNTIME_FLAGS | {"help"}}
    assert len(field_flags) > 20
    for dest, flag in field_flags.items():
        assert dest in fields, f"{flag} -> {dest}: no such TrainConfig field"
    argv = ["--lr", "0.5", "--mesh-fsdp", "2", "--keep", "4", "--steps", "9", "--dataset-option", "train_per_class=3",
            "--profile-steps", "2:4"]
    if script == "train":
        argv += ["--eval-sigma", "2", "--eval-every", "3", "--eval-split", "none"]
    cfg = cli.config_from_args(TrainConfig.tiny(), ap.parse_args(argv))
    assert (cfg.optimizer.learning_rate, cfg.mesh.fsdp, cfg.checkpoint.keep, cfg.steps, cfg.profile_steps) == (
        0.5, 2, 4, 9, (2, 4))
    assert cfg.data.options == {"train_per_class": 3, "test_per_class": 8}
    if script == "train":
        assert (cfg.eval.sigma, cfg.validation.every, cfg.validation.split) == (2.0, 3, None)


def test_print_config_prints_the_nested_tree_and_a_flat_config_file_still_works(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"learning_rate": 2e-4, "eval_at_end": False, "workdir": str(tmp_path / "w")}))
    assert load_script("train").main(["--config", str(old), "--grad-accum", "2", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optimizer"]["learning_rate"] == 2e-4 and printed["optimizer"]["grad_accum"] == 2
    assert printed["validation"]["at_end"] is False and "learning_rate" not in printed
    assert TrainConfig.from_dict(printed) == TrainConfig.tiny(workdir=str(tmp_path / "w"), **{
        "optimizer.learning_rate": 2e-4, "optimizer.grad_accum": 2, "validation.at_end": False})


def test_profile_steps_flag_is_checked():
    ap = load_script("train").build_parser()
    with pytest.raises(SystemExit):
        ap.parse_args(["--profile-steps", "4:2"])
    with pytest.raises(ConfigError, match="profile_steps"):
        TrainConfig(profile_steps=(3, 3))


def test_orbax_tuning_is_still_needed_and_applied():
    """Orbax's default jax.Array handler still writes every replicated array replica-parallel (no
    size threshold): the reason for tune_orbax_array_handler, whose handler is orbax's default one
    (built with orbax's private ArrayMetadata store) plus a threshold, for the orbax versions that
    pyproject.toml allows. When this fails, orbax changed: check whether the tuning can go, or what
    it must build now (and the pin)."""
    from pathlib import Path

    from orbax.checkpoint._src.serialization import type_handler_registry

    from diad_jax.train.checkpoint import ORBAX_VERSIONS, _version

    low, high = ORBAX_VERSIONS
    assert f'"orbax-checkpoint>={low},<{high}"' in (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert _version(low) <= _version(ocp.__version__) < _version(high)

    def settings(handler):  # every attribute: plain values as they are, objects by their class
        plain = (type(None), bool, int, str, dict)
        return {k: v if isinstance(v, plain) else type(v) for k, v in vars(handler).items()}

    default = dict(type_handler_registry._DEFAULT_TYPE_HANDLERS)[jax.Array]
    assert default._use_replica_parallel and default._min_slice_bytes_for_replica_parallel is None
    tune_orbax_array_handler()
    tuned = ocp.type_handlers.get_type_handler(jax.Array)
    assert type(tuned) is type(default)
    assert settings(tuned) == {**settings(default), "_min_slice_bytes_for_replica_parallel": REPLICA_PARALLEL_MIN_BYTES}


# ---- the optimiser beyond the reference, and what steps count ----------------------------------
def test_warmup_and_cosine_schedule_give_the_learning_rates_they_should():
    from diad_jax.train import learning_rate
    assert learning_rate(OptimizerConfig(), 100) == 1e-5  # the reference: a constant (no schedule state)
    lr = learning_rate(OptimizerConfig(learning_rate=1e-3, warmup_steps=10, schedule="cosine",
                                       end_learning_rate=1e-4), 110)
    got = {s: float(lr(s)) for s in (0, 4, 9, 10, 60, 110, 500)}
    want = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 60: 1e-4 + 0.9e-3 * 0.5, 110: 1e-4, 500: 1e-4}
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-5), (s, got[s])
    warm = learning_rate(OptimizerConfig(learning_rate=2e-4, warmup_steps=4), 100)
    assert [float(warm(s)) for s in (0, 3, 50)] == pytest.approx([5e-5, 2e-4, 2e-4])
    with pytest.raises(ConfigError, match="schedule must be one of"):
        OptimizerConfig(schedule="linear")
    with pytest.raises(ConfigError, match="max_grad_norm must be > 0"):
        OptimizerConfig(max_grad_norm=0.0)


def test_clipping_bounds_the_gradient_adam_sees():
    import jax.numpy as jnp
    import optax
    from diad_jax.train import make_optimizer
    params = {"w": jnp.zeros(4), "b": jnp.zeros(3)}
    grads = {"w": jnp.full(4, 30.0), "b": jnp.full(3, 40.0)}  # global norm sqrt(4*900 + 3*1600) = 91.65
    for max_norm, want_norm in ((2.0, 2.0), (None, float(optax.tree.norm(grads)))):
        opt = make_optimizer(OptimizerConfig(max_grad_norm=max_norm, weight_decay=0.0), 10)
        _, state = opt.update(grads, opt.init(params), params)
        adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))
        assert float(optax.tree.norm(adam.mu)) == pytest.approx(0.1 * want_norm, rel=1e-5)  # mu = (1 - b1) g


def test_a_multisteps_checkpoint_is_refused_with_what_to_do():
    """Train-state format 1 accumulated with optax.MultiSteps: such a checkpoint cannot resume (its
    optimizer state holds an accumulator, its steps counted micro-batches); format 2 resumes."""
    from diad_jax.errors import CheckpointError
    from diad_jax.train.checkpoint import TRAIN_STATE_FORMAT
    run = TrainConfig.reference()
    saved = TrainConfig.reference(**{"data.batch_size": 12}).to_dict()
    with pytest.raises(CheckpointError) as e:
        check_resume_compatible(saved, run, "runs/x/checkpoints/400")
    msg = str(e.value)
    assert "optax.MultiSteps" in msg and "runs/x/checkpoints/400" in msg and "init_checkpoint" in msg
    assert e.value.fields[:2] == ("data.batch_size", "optimizer.grad_accum")
    check_resume_compatible(saved, run, "ckpt", TRAIN_STATE_FORMAT)  # a current checkpoint: resumes
    check_resume_compatible({**saved, "optimizer": {**saved["optimizer"], "grad_accum": 1}}, run, "ckpt")
    with pytest.raises(ConfigError, match=r"optimizer.max_grad_norm \(on/off\): checkpoint False, this run True"):
        check_resume_compatible(saved, run.replace(**{"optimizer.max_grad_norm": 1.0}), "ckpt", TRAIN_STATE_FORMAT)


def test_the_batch_splits_into_micro_batches_over_the_devices():
    from diad_jax import sharding as shd
    from diad_jax.train import check_batch
    mesh = shd.make_mesh(2, 1, jax.devices()[:2])
    check_batch(TrainConfig.reference(), mesh, evaluates=False)  # 48 = 4 micro-batches x 12, 6 per device
    with pytest.raises(ConfigError) as e:
        check_batch(TrainConfig.reference(**{"data.batch_size": 12, "optimizer.grad_accum": 4}), mesh, False)
    assert str(e.value) == ("data.batch_size 12 must be a multiple of 4 micro-batches (optimizer.grad_accum) x the 2 "
                            "devices of the mesh (data=2 x fsdp=1 (2 cpu devices, 1 process(es))) = 8")


def test_remat_takes_a_policy_name_and_reads_the_bool_of_older_configs(caplog):
    """--remat names a policy (bare: 'blocks', every block recomputed, as the bool's 'on' was);
    older --config files and checkpoints' train_config hold a bool; an unknown name is refused, and
    so is any policy where it does nothing (fine-tuning the autoencoder)."""
    ap = load_script("train").build_parser()
    for argv, want in ((["--remat"], "blocks"), (["--remat", "dots"], "dots"), (["--remat", "false"], "none"),
                       ([], "none")):
        assert cli.config_from_args(TrainConfig.tiny(), ap.parse_args(argv)).remat == want, argv
    with pytest.raises(SystemExit):
        ap.parse_args(["--remat", "everything"])
    with pytest.raises(ConfigError, match=r"remat must be one of .*'convs_and_dots'"):
        TrainConfig(remat="everything")
    assert [TrainConfig.from_dict(unflatten_train_dict({"remat": old})[0]).remat for old in (True, False)] == [
        "blocks", "none"]
    from diad_jax.autoencoder import check_config
    with pytest.raises(ConfigError, match="does nothing when fine-tuning the autoencoder") as e:
        check_config(TrainConfig.tiny(remat="dots"))
    assert e.value.fields == ("remat",)
    with pytest.raises(ConfigError, match="for training DiAD on a frozen VAE") as e:  # so are cached latents
        check_config(TrainConfig.tiny(cache_latents=True))
    assert e.value.fields == ("cache_latents",)
