"""Checkpoint conversion: the key rule against the reference's names, the CLIs end to end against
diffusers' own converters, round trips, ResNet-50 parity, and every error case."""
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from diad_jax.checkpoints import load_model
from diad_jax.configs import ModelConfig
from diad_jax.convert.keys import flax_to_ldm_path, ldm_to_flax_path, split_group
from diad_jax.convert.ldm import ConversionError, expected_ldm_keys, ldm_to_params, params_to_ldm
from diad_jax.convert.pipeline import clip_context, convert_resnet, empty_prompt_ids
from diad_jax.convert.torch_io import CheckpointReadError, read_state_dict
from diad_jax.models.diad import DiAD
from diad_jax.models.resnet import ResNet50Features

from tests import oracle

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_KEYS = Path(__file__).parent / "data" / "reference_keys.tsv"


def load_cli(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "convert" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference_keys() -> dict:
    out = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        if line and not line.startswith("#"):
            k, s = line.split("\t")
            out[k] = tuple(json.loads(s))
    return out


# ---- the key rule ---------------------------------------------------------------------------------
def test_sd15_parameters_are_exactly_the_reference_keys():
    ours = expected_ldm_keys(DiAD(ModelConfig.sd15()).abstract_params())
    ref = reference_keys()
    assert len(ref) == 1283
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    # the spec's names for the new SG layers
    for i in range(1, 4):
        for j in range(1, 4):
            assert f"control_model.down{i}{j}.0.weight" in ours
            assert f"control_model.down{i}{j}.0.bias" not in ours  # no bias
    assert {f"control_model.input_hint_block.{i}.weight" for i in range(0, 16, 2)} <= set(ours)
    assert "control_model.input_hint_block.16.weight" not in ours
    assert {f"control_model.zero_convs.{i}.0.weight" for i in range(12)} <= set(ours)
    assert "control_model.middle_block_out.0.weight" in ours


def test_key_rule_round_trips_every_reference_key():
    for key in reference_keys():
        group, rest = split_group(key)
        path = ldm_to_flax_path(rest)
        assert flax_to_ldm_path(path[:-1]) + "." + path[-1] == rest, key


# ---- fixtures: a complete random tiny DiAD checkpoint -------------------------------------------
def tiny77() -> ModelConfig:
    """The tiny model with CLIP's 77-token context."""
    return replace(ModelConfig.tiny(), context_len=77)


@pytest.fixture(scope="module")
def diad_ckpt(tmp_path_factory):
    cfg = tiny77()
    sd = oracle.random_ldm_state_dict(cfg, seed=0)
    clip = oracle.random_clip_state_dict(cfg.unet.context_dim, layers=2, seed=0)
    resnet = {"pretrained_model." + k: v for k, v in oracle.random_timm_resnet50(0).items()}
    extra = {"betas": np.linspace(1e-4, 2e-2, 1000, dtype=np.float32),
             "alphas_cumprod": np.ones(1000, np.float32), "lvlb_weights": np.ones(1000, np.float32),
             "logvar": np.zeros(1000, np.float32),
             "model_ema.decay": np.array(0.999, np.float32), "model_ema.num_updates": np.array(5)}
    full = {**sd, **clip, **resnet, **extra}
    d = tmp_path_factory.mktemp("ckpt")
    path = d / "diad.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in full.items()}, "epoch": 3,
                "global_step": 100}, path)
    cfg_path = d / "tiny77.json"
    cfg_path.write_text(cfg.to_json())
    return dict(cfg=cfg, cfg_path=cfg_path, path=path, sd=sd, clip=clip, resnet=resnet, full=full, dir=d)


def run_cli(name, argv):
    return load_cli(name).main([str(a) for a in argv])


@pytest.fixture(scope="module")
def converted(diad_ckpt):
    out = diad_ckpt["dir"] / "flax"
    assert run_cli("torch_to_flax", ["--diad-ckpt", diad_ckpt["path"], "--config", diad_ckpt["cfg_path"],
                                     "--out", out]) == 0
    return load_model(out), out


def test_diad_ckpt_cli_matches_diffusers_reference(diad_ckpt, converted):
    """Convert with our CLI; load the same file into diffusers' PyTorch models with diffusers'
    single-file converters; the eps prediction and the VAE must agree."""
    ckpt, _ = converted
    cfg, sd = diad_ckpt["cfg"], diad_ckpt["sd"]
    assert ckpt.config == cfg
    model = DiAD(cfg)
    params = jax.tree.map(jnp.asarray, ckpt.params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, cfg.latent_size, cfg.latent_size), dtype=np.float32)
    hint = rng.standard_normal((2, 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    t = np.array([5, 700])
    ctx = np.repeat(np.asarray(ckpt.context), 2, axis=0)
    ctrl = oracle.torch_sg_outputs(oracle.diffusers_controlnet(cfg, sd), sd, cfg, x, t, ctx, hint)
    ref = oracle.torch_controlled_unet(oracle.diffusers_unet(cfg, sd), cfg, x, t, ctx, ctrl, True)
    ours = jax.jit(model.eps)(params, x, t, ckpt.context, hint)
    err, scale = oracle.max_err(ours, ref)
    print(f"converted eps vs diffusers: max abs err {err:.2e} (ref max {scale:.2f})")
    assert err < 2e-5 * max(scale, 1)
    vae = oracle.diffusers_vae(cfg, sd)
    ref_dec = vae.decode(torch.from_numpy(x)).sample
    err, scale = oracle.max_err(model.decode(params, x * cfg.scale_factor), ref_dec)
    print(f"converted VAE decode vs diffusers: max abs err {err:.2e}")
    assert err < 2e-5 * max(scale, 1)


def test_context_is_clip_on_the_empty_prompt(diad_ckpt, converted):
    from transformers import CLIPTextConfig, CLIPTextModel
    ckpt, _ = converted
    assert empty_prompt_ids(77) == [49406] + [49407] * 76
    hidden = diad_ckpt["cfg"].unet.context_dim
    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                                         num_hidden_layers=2, num_attention_heads=1,
                                         max_position_embeddings=77, hidden_act="quick_gelu")).eval()
    prefix = "cond_stage_model.transformer."
    strip = not any(k.startswith("text_model.") for k in model.state_dict())
    model.load_state_dict({(k[len(prefix) + len("text_model."):] if strip else k[len(prefix):]): torch.from_numpy(v)
                           for k, v in diad_ckpt["clip"].items()}, strict=True)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([[49406] + [49407] * 76])).last_hidden_state.numpy()
    assert ckpt.context.shape == (1, 77, hidden)
    np.testing.assert_allclose(ckpt.context, ref, atol=1e-6)
    # a different prompt would give a different context: the ids matter
    with torch.no_grad():
        other = model(input_ids=torch.tensor([[49406, 320] + [49407] * 75])).last_hidden_state.numpy()
    assert np.abs(other - ref).max() > 1e-3


def test_resnet_from_diad_ckpt_matches_transformers_resnet(diad_ckpt, converted):
    ckpt, _ = converted
    timm_sd = {k[len("pretrained_model."):]: v for k, v in diad_ckpt["resnet"].items()}
    check_resnet(ckpt.resnet, timm_sd)


def check_resnet(params, timm_sd, size=64):
    ref_model = oracle.hf_resnet50(timm_sd)
    x = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        hidden = ref_model(torch.from_numpy(x), output_hidden_states=True).hidden_states
    feats = jax.jit(ResNet50Features().apply)({"params": params}, jnp.transpose(x, (0, 2, 3, 1)))
    assert len(feats) == 3
    for i, f in enumerate(feats):
        err, scale = oracle.max_err(jnp.transpose(f, (0, 3, 1, 2)), hidden[i + 1])
        print(f"ResNet-50 layer{i + 1}: max abs err {err:.2e} (ref max {scale:.2f})")
        assert err < 1e-5 * max(scale, 1)


def test_resnet_cli_from_plain_timm_state_dict(tmp_path):
    timm_sd = oracle.random_timm_resnet50(seed=3)
    from safetensors.numpy import save_file
    save_file(timm_sd, str(tmp_path / "resnet50.safetensors"))
    params, report = convert_resnet(read_state_dict(tmp_path / "resnet50.safetensors"))
    check_resnet(params, timm_sd)
    assert any(k.endswith("num_batches_tracked") for k in report.ignored)
    assert any(k.startswith("pretrained_model.layer4.") for k in report.ignored)


def test_ignored_keys_are_exactly_the_non_parameters(diad_ckpt, converted):
    ckpt, out = converted
    from diad_jax.convert.pipeline import convert_diad
    conv = convert_diad(diad_ckpt["full"], diad_ckpt["cfg"])
    rep = conv.reports["diad"]
    ignored = set(rep.ignored)
    expected = {k for k in diad_ckpt["full"] if k in ("betas", "alphas_cumprod", "lvlb_weights", "logvar")
                or k.startswith(("model_ema.", "cond_stage_model.", "pretrained_model.layer4.", "pretrained_model.fc."))
                or k.endswith("num_batches_tracked")}
    assert ignored == expected
    assert set(rep.consumed) | ignored == set(diad_ckpt["full"])


# ---- start of training ---------------------------------------------------------------------------
def test_start_of_training_conversion(tmp_path):
    cfg = tiny77()
    sd_full = oracle.random_ldm_state_dict(cfg, seed=1, groups=("unet", "vae"))
    sd_full.update(oracle.random_clip_state_dict(cfg.unet.context_dim, seed=1))
    sd_full["model_ema.decay"] = np.array(0.9999, np.float32)
    sd_full["alphas_cumprod"] = np.ones(1000, np.float32)
    # the fine-tuned VAE: other weights, no prefix, plus its training losses
    vae = oracle.random_ldm_state_dict(cfg, seed=2, groups=("vae",))
    vae = {k[len("first_stage_model."):]: v for k, v in vae.items()}
    vae["loss.logvar"] = np.zeros((), np.float32)
    vae["loss.discriminator.main.0.weight"] = np.zeros((8, 3, 4, 4), np.float32)
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd_full.items()}, tmp_path / "sd.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in vae.items()}}, tmp_path / "vae.ckpt")
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    out = tmp_path / "init"
    assert run_cli("torch_to_flax", ["--sd-ckpt", tmp_path / "sd.ckpt", "--vae-ckpt", tmp_path / "vae.ckpt",
                                     "--config", tmp_path / "cfg.json", "--out", out]) == 0
    ckpt = load_model(out)
    ldm = params_to_ldm(ckpt.params)
    for k, v in sd_full.items():
        if k.startswith("model.diffusion_model."):
            np.testing.assert_array_equal(ldm[k], v)
            sg_key = "control_model." + k[len("model.diffusion_model."):]
            if sg_key in ldm:  # encoder, middle and time embedding copied by name
                np.testing.assert_array_equal(ldm[sg_key], v)
    for k, v in vae.items():
        if not k.startswith("loss."):
            np.testing.assert_array_equal(ldm["first_stage_model." + k], v)  # the fine-tuned VAE, not SD's
    sg_only = {k for k in ldm if k.startswith("control_model.")
               and "model.diffusion_model." + k[len("control_model."):] not in ldm}
    assert sg_only == {k for k in ldm if k.startswith("control_model.") and (
        ".input_hint_block." in k or ".zero_convs." in k or ".middle_block_out." in k or
        k.split(".")[1].startswith("down"))}
    for k in sg_only:
        last_hint = k.startswith("control_model.input_hint_block.14.")
        zero = last_hint or ".zero_convs." in k or ".middle_block_out." in k or k.split(".")[1].startswith("down")
        assert (not np.any(ldm[k])) == zero, k
    assert ckpt.resnet is None


# ---- round trips ---------------------------------------------------------------------------------
def test_round_trip_flax_ldm_flax_is_bit_exact():
    cfg = ModelConfig.tiny()
    model = DiAD(cfg)
    params = jax.tree.map(np.asarray, model.init(seed=5))
    back, _ = ldm_to_params(params_to_ldm(params), model.abstract_params())
    flat_a, flat_b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(back)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        assert flat_a[k].dtype == flat_b[k].dtype
        np.testing.assert_array_equal(flat_a[k], flat_b[k])


def test_round_trip_ldm_flax_ldm_through_both_clis(diad_ckpt, converted, tmp_path):
    _, out = converted
    st = tmp_path / "back.safetensors"
    assert run_cli("flax_to_torch", ["--checkpoint", out, "--out", st]) == 0
    back = read_state_dict(st)
    consumed = {k for k in diad_ckpt["full"] if k.startswith(("model.diffusion_model.", "control_model.",
                                                               "first_stage_model."))
                or (k.startswith("pretrained_model.") and not k.startswith(("pretrained_model.layer4",
                                                                            "pretrained_model.fc"))
                    and not k.endswith("num_batches_tracked"))}
    assert set(back) == consumed
    for k in consumed:
        np.testing.assert_array_equal(back[k], diad_ckpt["full"][k], err_msg=k)


# ---- errors ----------------------------------------------------------------------------------------
def test_corrupt_and_wrong_files(tmp_path, capsys):
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(b"\x80\x02not really a pickle" * 10)
    with pytest.raises(CheckpointReadError, match=r"corrupt\.ckpt: not a readable PyTorch checkpoint"):
        read_state_dict(bad)
    txt = tmp_path / "weights.txt"
    txt.write_text("hello")
    with pytest.raises(CheckpointReadError, match=r"weights\.txt: unsupported file type '\.txt'"):
        read_state_dict(txt)
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt: no such file"):
        read_state_dict(tmp_path / "nope.ckpt")
    # neither zip, pickle nor safetensors: said so, whatever the suffix, without the --unsafe-pickle hint
    zeros = tmp_path / "zeros.ckpt"
    zeros.write_bytes(bytes(100))
    with pytest.raises(CheckpointReadError, match=r"zeros\.ckpt: not a PyTorch checkpoint \(zip or pickle\) nor a "
                                                  r"safetensors file: 100 bytes, starting 00 00 00 00 00 00 00 00$"):
        read_state_dict(zeros)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointReadError, match=r"empty\.safetensors: not a PyTorch .*: the file is empty$"):
        read_state_dict(tmp_path / "empty.safetensors")
    st = tmp_path / "broken.safetensors"
    st.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointReadError, match=r"broken\.safetensors: not a readable \.safetensors file \(bad "
                                                  r"header length 1000000\)"):
        read_state_dict(st)
    # the format is the content's, not the suffix's
    from safetensors.numpy import save_file
    save_file({"w": np.ones(3, np.float32)}, str(tmp_path / "renamed.ckpt"))
    np.testing.assert_array_equal(read_state_dict(tmp_path / "renamed.ckpt")["w"], np.ones(3, np.float32))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointReadError, match=r"list\.pt: holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    # through the CLI: exit code 2 and the file named on stderr
    assert run_cli("torch_to_flax", ["--diad-ckpt", bad, "--out", tmp_path / "o"]) == 2
    assert "corrupt.ckpt" in capsys.readouterr().err
    assert run_cli("torch_to_flax", ["--diad-ckpt", zeros, "--out", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert "zeros.ckpt: not a PyTorch checkpoint" in err and "--unsafe-pickle" not in err


def test_missing_unexpected_and_misshaped_keys_are_all_listed(diad_ckpt, tmp_path, capsys):
    cfg = diad_ckpt["cfg"]
    abstract = DiAD(cfg).abstract_params()
    sd = dict(diad_ckpt["sd"])
    del sd["control_model.down23.0.weight"]
    del sd["model.diffusion_model.out.2.bias"]
    sd["control_model.extra_layer.weight"] = np.zeros((3, 3), np.float32)
    sd["model.diffusion_model.out.0.weight"] = np.zeros(7, np.float32)
    with pytest.raises(ConversionError) as e:
        ldm_to_params(sd, abstract, source="mine.ckpt")
    msg = str(e.value)
    print(msg)
    assert "mine.ckpt" in msg
    assert e.value.missing == ["control_model.down23.0.weight", "model.diffusion_model.out.2.bias"]
    assert e.value.unexpected == ["control_model.extra_layer.weight"]
    assert e.value.mismatched == [("model.diffusion_model.out.0.weight", (7,), (cfg.unet.model_channels,))]
    assert "control_model.down23.0.weight" in msg and "control_model.extra_layer.weight" in msg
    assert "(7,) vs (32,)" in msg
    # allow-lists make a known difference pass
    sd["model.diffusion_model.out.0.weight"] = diad_ckpt["sd"]["model.diffusion_model.out.0.weight"]
    params, rep = ldm_to_params(sd, abstract, allow_missing=["control_model.down*", "*.out.2.bias"],
                                allow_unexpected=["control_model.extra_layer.*"])
    assert not np.any(params["sg"]["down23_0"]["kernel"])
    assert rep.allowed_unexpected == ["control_model.extra_layer.weight"]
    assert sorted(rep.allowed_missing) == ["control_model.down23.0.weight", "model.diffusion_model.out.2.bias"]
    # the CLI reports the same lists and exits 2
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, tmp_path / "m.ckpt")
    rc = run_cli("torch_to_flax", ["--diad-ckpt", tmp_path / "m.ckpt", "--config", diad_ckpt["cfg_path"],
                                   "--prompt-context", _ctx_file(tmp_path, cfg), "--out", tmp_path / "o"])
    err = capsys.readouterr().err
    assert rc == 2 and "control_model.down23.0.weight" in err and "control_model.extra_layer.weight" in err


def _ctx_file(tmp_path, cfg):
    p = tmp_path / "ctx.npy"
    np.save(p, np.zeros((1, cfg.context_len, cfg.unet.context_dim), np.float32))
    return p


def test_wrong_config_reports_shapes_and_output_exists(diad_ckpt, converted, tmp_path, capsys):
    # the tiny checkpoint against the SD config: every shape is wrong, and the error says so
    rc = run_cli("torch_to_flax", ["--diad-ckpt", diad_ckpt["path"], "--config", "sd15",
                                   "--out", tmp_path / "o"])
    err = capsys.readouterr().err
    assert rc == 2 and "wrong shape" in err and "missing key(s)" in err
    lines = err[err.index("error: "):].splitlines()
    assert "the model config (--config) most likely does not fit this checkpoint" in lines[1]  # said first
    _, out = converted
    rc = run_cli("torch_to_flax", ["--diad-ckpt", diad_ckpt["path"], "--config", diad_ckpt["cfg_path"],
                                   "--out", out])
    assert rc == 2 and "exists" in capsys.readouterr().err
    bad_ctx = tmp_path / "bad_ctx.npy"
    np.save(bad_ctx, np.zeros((1, 5, 3), np.float32))
    rc = run_cli("torch_to_flax", ["--diad-ckpt", diad_ckpt["path"], "--config", diad_ckpt["cfg_path"],
                                   "--prompt-context", bad_ctx, "--out", tmp_path / "o2"])
    assert rc == 2 and "bad_ctx.npy: prompt context has shape (1, 5, 3)" in capsys.readouterr().err


def test_missing_clip_asks_for_prompt_context(diad_ckpt):
    with pytest.raises(ConversionError, match="cond_stage_model.transformer"):
        clip_context({k: v for k, v in diad_ckpt["full"].items() if not k.startswith("cond_stage_model.")})


def test_safetensors_reader_matches_the_library(tmp_path):
    """Our mmap-free reader against safetensors' own loader, every dtype including bf16 (kept as stored)."""
    from safetensors.torch import save_file
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "d": torch.randn(2, 2).half(), "e": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    sd = read_state_dict(tmp_path / "t.safetensors")
    assert sorted(sd) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(sd[k], v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy())
        assert str(sd[k].dtype) == str(v.dtype).removeprefix("torch."), k
    assert sd.pop("a").shape == (3, 4) and "a" not in sd and len(sd) == 4
