"""Smoke test of the convolutional-network benchmark (``benchmarks/convnets.py``)."""

import csv
import math
import pickle

import numpy as np
import pytest

from benchmarks import convnets

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_quick_run_writes_finite_results(tmp_path):
    result = convnets.main(["--quick", "--out", str(tmp_path)])
    for name in ("convnets.csv", "convnets.png", "convnets.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "convnets.md").read_text()
    for arch in convnets.ARCHS:
        assert f"## {arch}: best configuration per method" in text
        assert f"### {arch}: goals and observations" in text
    with open(tmp_path / "convnets.csv") as f:
        rows = list(csv.DictReader(f))
    pairs = {(row["arch"], row["method"]) for row in rows}
    assert pairs == {(a, m) for a in convnets.ARCHS for m in convnets.METHODS}
    for row in rows:
        for key in ("train_loss", "val_loss", "train_acc", "val_acc", "seconds"):
            assert math.isfinite(float(row[key])), (key, row)
        assert 0.0 <= float(row["val_acc"]) <= 1.0
    assert len(result["runs"]) == len(convnets.ARCHS) * len(convnets.METHODS)


def test_initialisation_makes_residual_blocks_identity():
    model, bn_model, _ = convnets.make_models("ResNet", "quick")
    x0 = np.zeros((1, 8, 8, 1), np.float32)
    params, bn_variables = convnets.init_variables(model, bn_model, x0, seed=0)
    block = params["block0_0"]
    assert not np.any(block["conv_out"]["kernel"])  # the branch starts at zero without BN
    bn_block = bn_variables["params"]["block0_0"]
    assert np.std(bn_block["conv_out"]["kernel"]) > 0  # He-normal with BN ...
    assert not np.any(bn_block["bn_out"]["scale"])  # ... and a zero scale after it
    np.testing.assert_array_equal(bn_block["conv_in"]["kernel"], block["conv_in"]["kernel"])
    fan_in = 3 * 3 * 8
    assert np.std(block["conv_in"]["kernel"]) == pytest.approx(math.sqrt(2 / fan_in), rel=0.3)


def _write_batch(path, images, labels):
    with open(path, "wb") as f:
        pickle.dump({b"data": images.reshape(len(images), -1), b"labels": list(labels)}, f)


def test_cifar_reader_on_synthetic_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    batches = []
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        chw = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)  # (n, channel, row, column)
        labels = [(i + j) % 10 for j in range(3)]
        _write_batch(root / name, chw, labels)
        batches.append((chw, labels))

    # The parent folder works too: the reader looks into cifar-10-batches-py.
    train_x, train_y, test_x, test_y = convnets.read_cifar10(str(tmp_path))
    assert train_x.shape == (15, 32, 32, 3) and train_x.dtype == np.uint8
    assert test_x.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(train_x[0], batches[0][0][0].transpose(1, 2, 0))  # HWC
    np.testing.assert_array_equal(test_x[2], batches[5][0][2].transpose(1, 2, 0))
    assert train_y.tolist() == [label for chw, labels in batches[:5] for label in labels]
    assert test_y.dtype == np.int32 and test_y.tolist() == batches[5][1]

    class Args:
        cifar_dir, digits_size, max_train, seed = str(root), 8, None, 0

    data = convnets.load_data(Args)
    assert data.train_x.dtype == np.float32 and data.train_x.shape == (15, 32, 32, 3)
    np.testing.assert_allclose(data.train_x.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(data.train_x.std(axis=(0, 1, 2)), 1.0, atol=1e-3)

    (root / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        convnets.read_cifar10(str(root))


def test_paper_sized_models_build():
    """VGG11 and ResNet34 (the CIFAR-10 models) on a 32x32x3 input, shapes only."""
    import jax

    x0 = np.zeros((2, 32, 32, 3), np.float32)
    for arch, n_kernels in (("VGG", 9), ("ResNet", 1 + 2 * 16 + 3 + 1)):
        model, bn_model, _ = convnets.make_models(arch, "paper")
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x0)
        kernels = [k for k in jax.tree_util.tree_leaves_with_path(shapes) if "kernel" in str(k[0])]
        assert len(kernels) == n_kernels, arch
        logits = jax.eval_shape(lambda p: model.apply(p, x0), shapes)  # noqa: B023
        assert logits.shape == (2, 10)
