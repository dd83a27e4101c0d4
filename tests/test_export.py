"""Detector.export -> diad_jax.exported.load: the exported program scores exactly as the Detector
(maps, scores, labels, masks), runs without the model code, and a damaged folder, another format
version, an edited manifest or a wrong input is refused with a message naming the file, the field
or the expected shape. The model is the micro config at 32 px, on the CPU (the only platform
tested; cuda and tpu are lowered too)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from diad_jax import exported
from diad_jax.calibration import Calibration, Threshold
from diad_jax.configs import EvalConfig
from diad_jax.detector import Detector, place_bundle
from diad_jax.errors import UserError
from diad_jax.models.diad import DiAD
from diad_jax.scoring import make_bundle, random_resnet

from tests.conftest import MICRO
from tests.scripts import ROOT, run_script

pytestmark = pytest.mark.xdist_group("export")  # one worker builds the exported folder for every test

# two DDIM steps with eta > 0 (the per-image DDIM noise too), the reference's ResNet-50 comparator
EVAL = EvalConfig(ddim_steps=2, eta=0.5, seed=3, batch_size=4).scaled_footprint(MICRO.image_size)


def _threshold(values) -> Threshold:
    """A threshold in the widest gap between the middle half of `values` (so labels and masks are mixed)."""
    v = np.sort(np.ravel(values))
    lo, hi = len(v) // 4, max(3 * len(v) // 4, 1)
    j = lo + int(np.argmax(np.diff(v)[lo:hi]))
    return Threshold(float(v[j] + v[j + 1]) / 2, "test", None, float(v[0]), float(v[-1]), v.size, 0)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(the Detector's predictions of 3 images, the images, the exported folder): scored in a batch of
    4 (3 + 1 padding), exported for that batch (the default), with thresholds that give mixed labels
    and masks."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x if np.any(x) else rng.normal(0, 0.02, x.shape).astype(np.float32),
                          jax.device_get(DiAD(MICRO).init(seed=1)))  # zero-initialised layers filled
    ctx = rng.standard_normal((1, MICRO.context_len, MICRO.unet.context_dim)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    det = Detector(MICRO, place_bundle(make_bundle(params, random_resnet(0), ctx), mesh), eval_config=EVAL, mesh=mesh)
    images = rng.integers(0, 256, (3, MICRO.image_size, MICRO.image_size, 3), dtype=np.uint8)
    first = det.predict(images)
    det.calibration = Calibration(_threshold([p.score for p in first]), {}, _threshold([p.anomaly_map for p in first]),
                                  "test")
    path = det.export(tmp_path_factory.mktemp("export") / "micro")
    return det.predict(images), images, path


def test_exported_scores_equal_the_detectors(scored):
    preds, images, path = scored
    manifest = json.loads((path / exported.MANIFEST).read_text())
    assert manifest["batch_size"] == 4 and manifest["platforms"] == ["cpu", "cuda", "tpu"]
    assert manifest["eval_config"] == EVAL.to_dict() and manifest["seed"] == 3
    ex = exported.load(path)
    out = ex.score(images)
    maps_diff = np.abs(out.maps - np.stack([p.anomaly_map for p in preds])).max()
    scores_diff = np.abs(out.scores - np.array([p.score for p in preds])).max()
    print(f"exported vs Detector, max abs diff: maps {maps_diff:.3g}, scores {scores_diff:.3g}")
    assert maps_diff <= 1e-6 and scores_diff <= 1e-6
    assert out.labels.tolist() == [p.label for p in preds] and 0 < sum(out.labels) < 3
    np.testing.assert_array_equal(out.normalized_scores, [p.normalized_score for p in preds])
    np.testing.assert_array_equal(out.masks, np.stack([p.mask for p in preds]))
    assert 0 < out.masks.mean() < 1
    # image ids given explicitly: the same noise, so the same scores (and other ids: other scores)
    np.testing.assert_allclose(ex.score(images[1:], index=[1, 2]).scores, out.scores[1:], rtol=0, atol=1e-6)
    assert np.abs(ex.score(images[1:]).scores - out.scores[1:]).min() > 1e-4


def test_exported_runs_without_the_model_code(scored, tmp_path):
    """In a fresh process: load and score, then no flax, models, diffusion or scoring module was imported."""
    preds, images, path = scored
    np.save(tmp_path / "images.npy", images)
    code = (f"import sys, numpy as np\nimport diad_jax.exported as e\n"
            f"out = e.load({str(path)!r}).score(np.load({str(tmp_path / 'images.npy')!r}))\n"
            f"bad = [m for m in sys.modules if m.startswith(('diad_jax.models', 'diad_jax.scoring', "
            f"'diad_jax.diffusion', 'flax'))]\n"
            f"assert not bad, bad\nprint(out.scores.tolist())\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_allclose(json.loads(run.stdout.strip().splitlines()[-1]), [p.score for p in preds], atol=1e-6)


def _copy(path, tmp_path):
    return shutil.copytree(path, tmp_path / "copy")


@pytest.mark.parametrize("name", [exported.PROGRAM, exported.WEIGHTS])
def test_a_truncated_file_is_refused_naming_it(scored, tmp_path, name):
    path = _copy(scored[2], tmp_path)
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[:len(data) // 2])
    with pytest.raises(exported.ExportError, match=rf"{name}: {len(data) // 2} bytes, the manifest records "
                                                   rf"{len(data)}: truncated"):
        exported.load(path)
    # truncated before the manifest recorded it: the file's reader fails, and the error still names it
    manifest = json.loads((path / exported.MANIFEST).read_text())
    manifest["files"][name] = exported._fingerprint(path / name)
    (path / exported.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(exported.ExportError, match=rf"{name}: not a"):
        exported.load(path)


def test_a_changed_file_is_refused(scored, tmp_path):
    path = _copy(scored[2], tmp_path)
    data = bytearray((path / exported.WEIGHTS).read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    (path / exported.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(exported.ExportError, match=rf"{exported.WEIGHTS}: damaged \(its SHA-256"):
        exported.load(path)


def _edit(path, field, value, text=None):
    """Sets `field` (a "."-joined path) of the manifest of `path` (or of the manifest `text`) to `value`."""
    manifest = json.loads((path / exported.MANIFEST).read_text() if text is None else text)
    *parents, last = field.split(".")
    d = manifest
    for k in parents:
        d = d[k]
    d[last] = value
    (path / exported.MANIFEST).write_text(json.dumps(manifest))


def test_another_format_version_is_refused(scored, tmp_path):
    path = _copy(scored[2], tmp_path)
    _edit(path, "format_version", exported.FORMAT_VERSION + 1)
    with pytest.raises(exported.ExportError, match=rf"manifest.json: format version {exported.FORMAT_VERSION + 1} "
                                                   rf".*reads version {exported.FORMAT_VERSION}"):
        exported.load(path)


def test_a_manifest_field_of_the_wrong_kind_or_at_odds_with_the_program_is_named(scored, tmp_path):
    """One line naming the field, checked before the manifest's checksum (which would refuse them all)."""
    path = _copy(scored[2], tmp_path)
    original = (path / exported.MANIFEST).read_text()
    program = r"but program.bin takes float32\[4, 3, 32, 32\] images and a uint32\[2\] key, lowered for cpu, cuda, tpu"
    for field, value, message in [
            ("batch_size", 3, rf"batch_size is 3, {program}: the manifest was edited"),
            ("image_size", 64, rf"image_size is 64, {program}"),
            ("key", [0, 3, 1], rf"key is \[0, 3, 1\], {program}"),
            ("platforms", ["cpu"], rf'platforms is \["cpu"\], {program}'),
            ("batch_size", 0, r"batch_size is 0; expected an integer >= 1"),
            ("batch_size", "2", r'batch_size is "2"; expected an integer >= 1'),
            ("key", [0, 2**32], r"key is \[0, 4294967296\]; expected a list of uint32 integers"),
            ("normalization.std", [0.2, 0.2, 0], r"normalization is .*; expected \{\"mean\": \[3 finite numbers\]"),
            ("files", {}, r"files is \{\}; expected \{\"program.bin\": ..."),
            ("calibration", {"foo": 1}, r"calibration is not null or the thresholds .* \(KeyError: 'image'\)"),
            ("calibration.pixel.value", None, r"calibration.pixel: value None, .*; expected finite numbers")]:
        _edit(path, field, value, original)
        with pytest.raises(exported.ExportError) as e:
            exported.load(path)
        assert re.fullmatch(rf"{re.escape(str(path / exported.MANIFEST))}: {message}.*", str(e.value)), str(e.value)
        assert "\n" not in str(e.value)


def test_an_edited_manifest_is_refused(scored, tmp_path):
    """Values the program cannot check (the normalisation, the key, the seed) are covered by manifest.sha256."""
    path = _copy(scored[2], tmp_path)
    original = (path / exported.MANIFEST).read_text()
    for field, value in [("normalization.mean", [0.5, 0.5, 0.5]), ("key", [0, 4]), ("seed", 4)]:
        _edit(path, field, value, original)
        with pytest.raises(exported.ExportError, match=r"manifest.json: changed since the export \(its SHA-256 is "
                                                       r"not the one manifest.sha256 records\)"):
            exported.load(path)
    (path / exported.MANIFEST).write_text(original)
    (path / "manifest.sha256").unlink()
    with pytest.raises(exported.ExportError, match=r"manifest.sha256: missing from the exported folder"):
        exported.load(path)


def test_a_wrong_input_names_the_expected_shape(scored):
    ex = exported.load(scored[2])
    for bad in (np.zeros((2, 3, 32, 32), np.uint8), np.zeros((2, 32, 32, 3), np.float32),
                np.zeros((2, 64, 64, 3), np.uint8)):
        with pytest.raises(UserError, match=r"images: .*expected uint8 \(N, 32, 32, 3\)"):
            ex.score(bad)
    with pytest.raises(UserError, match=r"images\[1\]: uint8 \(16, 16, 3\); expected uint8 \(32, 32, 3\)"):
        ex.score([np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)])
    with pytest.raises(UserError, match=r"index: int64\[1\]; expected 2 integer image ids"):
        ex.score(np.zeros((2, 32, 32, 3), np.uint8), index=[0])
    # ids the program's int32 would wrap (2**32 + 1 would score as image 1), and -1, its padding
    for index, at in (([0, 2**31], 1), ([0, 2**32 + 1], 1), ([-1, 0], 0)):
        with pytest.raises(UserError, match=rf"index\[{at}\]: image id {index[at]} is outside 0..2147483647 "):
            ex.score(np.zeros((2, 32, 32, 3), np.uint8), index=index)


def test_export_script(tmp_path, capsys):
    argv = ["--checkpoint", "random:tiny", "--batch-size", 2, "--comparator", "pixel_l1", "--scaled-footprint"]
    assert run_script("export", argv + ["--out", tmp_path / "tiny", "--platforms", "cpu"]) == 0
    ex = exported.load(tmp_path / "tiny")  # deserialised and its weights checked against the program (not run)
    assert (ex.batch_size, ex.image_size, ex.manifest["platforms"]) == (2, 64, ["cpu"])
    assert ex.manifest["eval_config"]["comparator"] == "pixel_l1" and ex.calibration is None
    assert "RANDOM weights" in ex.notes[0]
    with pytest.raises(SystemExit):
        run_script("export", argv + ["--out", tmp_path / "gpu", "--platforms", "gpu"])
    assert "--platforms: choose from cpu, cuda, rocm, tpu, got gpu" in capsys.readouterr().err
