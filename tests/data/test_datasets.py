"""Datasets: sources, preprocessing against torchvision's transforms, deterministic splits
that never overlap, calibration sampling, and clear errors naming the file at fault."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import calibration_batches, calibration_indices, load_splits
from calibration.errors import CalibrationError
from pipeline.config import DataConfig, InputSpec, PreprocessConfig, SplitConfig
from pipeline.errors import DataError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _photos() -> dict[str, np.ndarray]:
    from skimage import data as skd

    return {"astronaut": skd.astronaut(), "coffee": skd.coffee(), "chelsea": skd.chelsea(), "rocket": skd.rocket()}


def _save(arr: np.ndarray, path: Path, size: tuple[int, int] | None = None) -> Path:
    from PIL import Image

    img = Image.fromarray(arr)
    if size:
        img = img.resize(size, Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """Two classes of real photos at assorted sizes and formats (PNG and JPEG)."""
    root = tmp_path / "images"
    photos = _photos()
    sizes = [(64, 48), (50, 70), (45, 45), (80, 60)]
    for k, (name, arr) in enumerate(photos.items()):
        cls = "cats" if name in ("chelsea", "coffee") else "people"
        for j, size in enumerate(sizes):
            _save(arr, root / cls / f"{name}_{j}{'.png' if j % 2 else '.jpg'}", size)
    return root


def _image_cfg(path: Path, **pre) -> DataConfig:
    base = dict(resize=40, center_crop=32, scale=1 / 255, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    base.update(pre)
    return DataConfig(source="image_folder", path=str(path), preprocess=PreprocessConfig(**base),
                      split=SplitConfig(train=0.5, calibration=0.25, evaluation=0.25))


def _torchvision_reference(path: str, resize: int, crop: int) -> np.ndarray:
    """torchvision's standard ImageNet eval transform of one file, CHW float32."""
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Image.open(path) as im:
        return tf(im.convert("RGB")).numpy()


# -- digits and arrays ------------------------------------------------------------------------
def test_digits_splits_are_deterministic_disjoint_and_preprocessed():
    data = DataConfig(preprocess=PreprocessConfig(scale=0.0625, mean=[0.5], std=[0.5]))
    spec = InputSpec(shape=[1, 8, 8])
    a, b = load_splits(data, spec), load_splits(data, spec)
    assert (len(a.train), len(a.calibration), len(a.evaluation)) == (1078, 359, 359)
    np.testing.assert_array_equal(a.calibration.x["input"], b.calibration.x["input"])
    ids = [set(s.ids) for s in (a.train, a.calibration, a.evaluation)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])

    from sklearn.datasets import load_digits

    raw = load_digits().images.astype(np.float32)
    first = int(a.calibration.ids[0].split("[")[1].rstrip("]"))
    np.testing.assert_allclose(a.calibration.x["input"][0, 0], (raw[first] * 0.0625 - 0.5) / 0.5, rtol=0, atol=1e-6)
    assert a.calibration.x["input"].dtype == np.float32

    other = load_splits(data.model_copy(update={"seed": 1}), spec)
    assert other.calibration.ids != a.calibration.ids


def test_max_samples_is_a_seeded_subset_not_the_first_rows():
    data = DataConfig(max_samples=100, split=SplitConfig(train=0.5, calibration=0.25, evaluation=0.25))
    s = load_splits(data, InputSpec(shape=[1, 8, 8]))
    assert len(s.train) + len(s.calibration) + len(s.evaluation) == 100
    indices = [int(i.split("[")[1].rstrip("]")) for i in s.train.ids + s.calibration.ids + s.evaluation.ids]
    assert max(indices) > 100  # not simply rows 0..99


def test_npz_and_npy_sources(tmp_path: Path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 3, 4, 4)).astype(np.uint8)
    y = rng.integers(0, 3, 40)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.save(tmp_path / "d.npy", x)
    pre = PreprocessConfig(scale=1 / 255, mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4])
    spec = InputSpec(shape=[3, 4, 4])
    s = load_splits(DataConfig(source="npz", path=str(tmp_path / "d.npz"), preprocess=pre), spec)
    i = int(s.evaluation.ids[0].rsplit("[", 1)[1].rstrip("]"))
    mean, std = np.array(pre.mean, np.float32)[:, None, None], np.array(pre.std, np.float32)[:, None, None]
    np.testing.assert_allclose(s.evaluation.x["input"][0], (x[i] / np.float32(255) - mean) / std, atol=1e-6)
    assert s.evaluation.y[0] == y[i]
    t = load_splits(DataConfig(source="npy", path=str(tmp_path / "d.npy"), preprocess=pre), spec)
    assert t.evaluation.y is None
    np.testing.assert_array_equal(t.evaluation.x["input"], s.evaluation.x["input"])


def test_array_errors_name_the_file(tmp_path: Path):
    spec = InputSpec(shape=[1, 8, 8])
    with pytest.raises(DataError, match="d.npz.*not found"):
        load_splits(DataConfig(source="npz", path=str(tmp_path / "d.npz")), spec)
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 1, 8, 8)))
    with pytest.raises(DataError, match=r"bad\.npz.*'x'"):
        load_splits(DataConfig(source="npz", path=str(tmp_path / "bad.npz")), spec)
    np.save(tmp_path / "wrong.npy", np.zeros((20, 1, 9, 9), np.float32))
    with pytest.raises(DataError, match=r"wrong\.npy.*\[1, 9, 9\].*expects \[1, 8, 8\]"):
        load_splits(DataConfig(source="npy", path=str(tmp_path / "wrong.npy")), spec)
    nan = np.zeros((20, 1, 8, 8), np.float32)
    nan[7, 0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DataError, match=r"nan\.npy\[7\].*NaN"):
        load_splits(DataConfig(source="npy", path=str(tmp_path / "nan.npy"), split=SplitConfig(
            train=0.0, calibration=0.5, evaluation=0.5)), spec)


def test_array_resize_and_crop_in_nhwc(tmp_path: Path):
    x = np.random.default_rng(1).random((8, 20, 30, 3)).astype(np.float32)
    np.save(tmp_path / "d.npy", x)
    data = DataConfig(source="npy", path=str(tmp_path / "d.npy"),
                      preprocess=PreprocessConfig(resize=12, center_crop=10, layout="nhwc"),
                      split=SplitConfig(train=0.5, calibration=0.25, evaluation=0.25))
    s = load_splits(data, InputSpec(shape=[10, 10, 3]))
    assert s.train.x["input"].shape == (4, 10, 10, 3)


# -- image folders ------------------------------------------------------------------------------
def test_image_folder_matches_torchvision_and_labels_classes(class_folder: Path):
    s = load_splits(_image_cfg(class_folder), InputSpec(shape=[3, 32, 32]))
    assert len(s.train) + len(s.calibration) + len(s.evaluation) == 16
    assert s.train.classes == ["cats", "people"]
    for part in (s.train, s.calibration, s.evaluation):
        for k, path in enumerate(part.ids):
            np.testing.assert_allclose(part.x["input"][k], _torchvision_reference(path, 40, 32), rtol=0, atol=2e-6)
            assert part.y[k] == (0 if "/cats/" in path else 1)
    all_ids = s.train.ids + s.calibration.ids + s.evaluation.ids
    assert len(set(all_ids)) == 16  # disjoint


def test_image_folder_bgr_nhwc_float16(class_folder: Path):
    cfg = _image_cfg(class_folder, channel_order="bgr", layout="nhwc", dtype="float16",
                     mean=IMAGENET_MEAN[::-1], std=IMAGENET_STD[::-1])
    s = load_splits(cfg, InputSpec(shape=[32, 32, 3], dtype="float16"))
    assert s.calibration.x["input"].dtype == np.float16 and s.calibration.x["input"].shape[1:] == (32, 32, 3)
    ref = _torchvision_reference(s.calibration.ids[0], 40, 32)  # RGB, CHW
    np.testing.assert_allclose(s.calibration.x["input"][0].astype(np.float32), ref[::-1].transpose(1, 2, 0), atol=2e-3)


def test_flat_folder_has_no_labels_and_grayscale_goes_to_rgb(tmp_path: Path):
    from skimage import data as skd

    for j, (name, arr) in enumerate(_photos().items()):
        _save(arr, tmp_path / "flat" / f"{name}.png", (40, 40))
    _save(skd.camera(), tmp_path / "flat" / "camera.png", (40, 40))  # grayscale
    cfg = _image_cfg(tmp_path / "flat", resize=None, center_crop=None)
    s = load_splits(cfg.model_copy(update={"split": SplitConfig(train=0.2, calibration=0.4, evaluation=0.4)}),
                    InputSpec(shape=[3, 40, 40]))
    assert s.train.y is None and s.evaluation.y is None
    gray = [s_.x["input"][k] for s_ in (s.train, s.calibration, s.evaluation) for k, p in enumerate(s_.ids) if "camera" in p][0]
    raw = gray * np.array(IMAGENET_STD, np.float32)[:, None, None] + np.array(IMAGENET_MEAN, np.float32)[:, None, None]
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-5)  # the one gray channel, replicated


def test_wrong_image_size_names_the_file(tmp_path: Path):
    photos = _photos()
    for name, arr in photos.items():
        _save(arr, tmp_path / "imgs" / f"{name}.png", (32, 32))
    _save(photos["coffee"], tmp_path / "imgs" / "odd_one.png", (50, 40))
    cfg = _image_cfg(tmp_path / "imgs", resize=None, center_crop=None)
    with pytest.raises(DataError, match=r"odd_one\.png: image is 50x40 after preprocessing.*expects 32x32"):
        load_splits(cfg.model_copy(update={"split": SplitConfig(train=0, calibration=0.5, evaluation=0.5)}),
                    InputSpec(shape=[3, 32, 32]))


def test_wrong_channel_count_names_the_file(tmp_path: Path):
    _save(_photos()["rocket"], tmp_path / "imgs" / "rocket.png", (8, 8))
    for k in range(3):
        _save(np.full((8, 8), 40 * k, np.uint8), tmp_path / "imgs" / f"gray{k}.png")
    cfg = _image_cfg(tmp_path / "imgs", resize=None, center_crop=None, mean=None, std=None)
    cfg = cfg.model_copy(update={"split": SplitConfig(train=0, calibration=0.5, evaluation=0.5)})
    with pytest.raises(DataError, match=r"rocket\.png: image has 3 channel\(s\).*expects 1"):
        load_splits(cfg, InputSpec(shape=[1, 8, 8]))
    rgba = np.zeros((8, 8, 4), np.uint8)
    _save(rgba, tmp_path / "rgba" / "a.png")
    _save(rgba, tmp_path / "rgba" / "b.png")
    with pytest.raises(DataError, match=r"\.png: image has 4 channel\(s\).*expects 3"):
        load_splits(cfg.model_copy(update={"path": str(tmp_path / "rgba")}), InputSpec(shape=[3, 8, 8]))


def test_crop_larger_than_image_and_undecodable_file(tmp_path: Path):
    _save(_photos()["coffee"], tmp_path / "a" / "small.png", (20, 20))
    _save(_photos()["coffee"], tmp_path / "a" / "small2.png", (20, 20))
    cfg = _image_cfg(tmp_path / "a", resize=None, center_crop=32)
    cfg = cfg.model_copy(update={"split": SplitConfig(train=0, calibration=0.5, evaluation=0.5)})
    with pytest.raises(DataError, match=r"small2?\.png: image is 20x20.*center_crop=32"):
        load_splits(cfg, InputSpec(shape=[3, 32, 32]))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "b" / "broken2.jpg").write_bytes(b"\xff\xd8 nope")
    with pytest.raises(DataError, match=r"broken2?\.(png|jpg): cannot decode image"):
        load_splits(cfg.model_copy(update={"path": str(tmp_path / "b")}), InputSpec(shape=[3, 32, 32]))


def test_empty_and_malformed_folders(tmp_path: Path):
    spec = InputSpec(shape=[3, 8, 8])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"empty: no images found"):
        load_splits(_image_cfg(tmp_path / "empty"), spec)
    (tmp_path / "cls" / "a").mkdir(parents=True)
    (tmp_path / "cls" / "b").mkdir()
    _save(np.zeros((8, 8, 3), np.uint8), tmp_path / "cls" / "a" / "x.png")
    with pytest.raises(DataError, match=r"class folder 'b' holds no images"):
        load_splits(_image_cfg(tmp_path / "cls"), spec)
    _save(np.zeros((8, 8, 3), np.uint8), tmp_path / "cls" / "b" / "y.png")
    _save(np.zeros((8, 8, 3), np.uint8), tmp_path / "cls" / "stray.png")
    with pytest.raises(DataError, match=r"holds both images .*stray\.png.* and subfolders"):
        load_splits(_image_cfg(tmp_path / "cls"), spec)
    with pytest.raises(DataError, match=r"missing: image folder not found \(data\.path\)"):
        load_splits(_image_cfg(tmp_path / "missing"), spec)


def test_separate_calibration_folder_never_overlaps_evaluation(class_folder: Path, tmp_path: Path):
    calib = tmp_path / "calib"
    for name, arr in _photos().items():
        _save(arr, calib / f"{name}_c.png", (48, 48))
    cfg = _image_cfg(class_folder).model_copy(update={"calibration_path": str(calib)})
    s = load_splits(cfg, InputSpec(shape=[3, 32, 32]))
    assert len(s.calibration) == 4 and all(p.startswith(str(calib)) for p in s.calibration.ids)
    assert len(s.train) + len(s.evaluation) == 16  # all of the main folder, split train:evaluation
    assert len(s.train) == 11  # split.train : split.evaluation = 0.5 : 0.25
    assert not set(s.calibration.ids) & set(s.evaluation.ids)

    with pytest.raises(DataError, match="calibration must not overlap evaluation"):
        load_splits(cfg.model_copy(update={"calibration_path": str(class_folder)}), InputSpec(shape=[3, 32, 32]))
    (tmp_path / "linked").mkdir()
    first = sorted((class_folder / "cats").iterdir())[0]
    (tmp_path / "linked" / "same.jpg").symlink_to(first)
    with pytest.raises(DataError, match=r"shares 1 image\(s\) with data\.path"):
        load_splits(cfg.model_copy(update={"calibration_path": str(tmp_path / "linked")}),
                    InputSpec(shape=[3, 32, 32]))


# -- module:function -----------------------------------------------------------------------------
@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_batches.py").write_text(textwrap.dedent("""
        import numpy as np

        def labelled():
            rng = np.random.default_rng(0)
            for _ in range(5):
                yield rng.random((8, 1, 8, 8)).astype(np.float32) * 16, rng.integers(0, 10, 8)

        def unlabelled():
            for k in range(4):
                yield np.full((10, 1, 8, 8), float(k), np.float32)

        def endless():
            while True:
                yield np.zeros((16, 1, 8, 8), np.float32)

        def bad():
            yield (np.zeros((2, 1, 8, 8)), np.zeros(2), np.zeros(2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_batches"
    sys.modules.pop("my_batches", None)


def test_factory_source(factory_module: str):
    spec = InputSpec(shape=[1, 8, 8])
    s = load_splits(DataConfig(source="factory", path=f"{factory_module}:labelled"), spec)
    assert len(s.train) + len(s.calibration) + len(s.evaluation) == 40 and s.train.y is not None
    u = load_splits(DataConfig(source="factory", path=f"{factory_module}:unlabelled"), spec)
    assert u.train.y is None
    e = load_splits(DataConfig(source="factory", path=f"{factory_module}:endless", max_samples=64), spec)
    assert len(e.train) + len(e.calibration) + len(e.evaluation) == 64
    with pytest.raises(DataError, match=r"my_batches:bad: batch 0 is a sequence of 3 items"):
        load_splits(DataConfig(source="factory", path=f"{factory_module}:bad"), spec)
    with pytest.raises(DataError, match=r"no callable 'nope'"):
        load_splits(DataConfig(source="factory", path=f"{factory_module}:nope"), spec)


# -- calibration sampling ---------------------------------------------------------------------------
def test_calibration_indices_and_batches():
    np.testing.assert_array_equal(calibration_indices(100, 512, 0), np.arange(100))
    a, b = calibration_indices(1000, 64, 3), calibration_indices(1000, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 64 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, calibration_indices(1000, 64, 4))

    x = np.arange(1000, dtype=np.float32)[:, None]
    batches = list(calibration_batches(x, np.arange(100), 32))
    assert [len(b) for b in batches] == [32, 32, 32]  # the partial last batch is dropped
    np.testing.assert_array_equal(batches[1][:, 0], np.arange(32, 64))
    picked = list(calibration_batches(x, a[:40], 16))
    np.testing.assert_array_equal(np.concatenate(picked)[:, 0], a[:32])
    with pytest.raises(CalibrationError, match=r"calib\.npy: 10 calibration samples are fewer than one batch of 32"):
        calibration_batches(x, np.arange(10), 32, source="calib.npy")
