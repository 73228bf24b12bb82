"""PCA layers: projections checked against numpy float64 eigendecompositions of the same data."""
import io

import numpy as np
import pytest
import torch
from torch import nn

from delve.pca_layers import (
    Conv2DPCALayer,
    LinearPCALayer,
    change_all_pca_layer_centering,
    change_all_pca_layer_thresholds,
    change_all_pca_layer_thresholds_and_inject_random_directions,
    rvs,
)


def reference_basis(samples, threshold, centering):
    """Mean, kept eigenvectors (columns, largest first) and k, computed with numpy in float64."""
    x = np.asarray(samples, dtype=np.float64)
    mean = x.mean(axis=0)
    moment = (x - mean).T @ (x - mean) / len(x) if centering else x.T @ x / len(x)
    values, vectors = np.linalg.eigh(moment)
    values, vectors = values[::-1].clip(min=0), vectors[:, ::-1]
    shares = np.cumsum(values) / values.sum()
    k = int(np.argmax(shares >= threshold * (1 - 1e-10))) + 1
    return mean, vectors[:, :k], k


def reference_projection(train, test, threshold, centering):
    mean, basis, k = reference_basis(train, threshold, centering)
    test = np.asarray(test, dtype=np.float64)
    projector = basis @ basis.T
    if centering:
        return (test - mean) @ projector + mean, k
    return test @ projector, k


def low_rank_data(n, dim=8, scales=(5.0, 2.0, 0.7), noise=0.02, offset=3.0, seed=0):
    """Samples near a len(scales)-dimensional subspace with distinct variances, around a non-zero mean."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:, : len(scales)]
    latent = rng.standard_normal((n, len(scales))) * np.asarray(scales)
    data = latent @ directions.T + noise * rng.standard_normal((n, dim)) + offset * rng.standard_normal(dim)
    return data.astype(np.float32)


def train_on(layer, data, batch_sizes=(7, 50, 1, 100)):
    """Feed ``data`` in batches of uneven sizes in training mode; return the layer in eval mode."""
    layer.train()
    start = 0
    sizes = list(batch_sizes)
    while start < len(data):
        size = sizes[0]
        sizes = sizes[1:] + sizes[:1]
        batch = torch.from_numpy(data[start : start + size])
        out = layer(batch)
        assert torch.equal(out, batch), "training mode must pass the data through unchanged"
        start += size
    return layer.eval()


@pytest.mark.parametrize("centering", [True, False])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99, 0.999, 1.0])
def test_linear_projection_matches_numpy(centering, threshold):
    train, test = low_rank_data(400), low_rank_data(30, seed=1)
    layer = train_on(LinearPCALayer(8, threshold=threshold, centering=centering), train)
    out = layer(torch.from_numpy(test))
    expected, k = reference_projection(train, test, threshold, centering)
    assert layer.in_dim == k and layer.fs_dim == 8
    assert layer.sat == round(100 * k / 8, 4)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("centering", [True, False])
def test_keepdim_false_returns_eigen_coordinates(centering):
    train, test = low_rank_data(300), low_rank_data(20, seed=2)
    layer = train_on(LinearPCALayer(8, threshold=0.99, keepdim=False, centering=centering), train)
    out = layer(torch.from_numpy(test)).numpy()
    mean, basis, k = reference_basis(train, 0.99, centering)
    expected = (test - mean) @ basis if centering else test @ basis
    assert out.shape == (20, k) and k == 3
    signs = np.sign(np.sum(out * expected, axis=0))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(out * signs, expected, rtol=1e-4, atol=1e-4)


def test_centering_uses_the_running_mean():
    rng = np.random.default_rng(3)
    direction = rng.standard_normal(6)
    direction /= np.linalg.norm(direction)
    offset = 50.0 * rng.standard_normal(6)
    train = (offset + np.outer(rng.standard_normal(500), direction)).astype(np.float32)
    layer = train_on(LinearPCALayer(6, threshold=0.999, centering=True), train)
    # A point on the affine line of the data is reproduced exactly; one off it is pulled onto it.
    on_line = (offset + 2.5 * direction).astype(np.float32)[None]
    np.testing.assert_allclose(layer(torch.from_numpy(on_line)).numpy(), on_line, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(layer.mean.numpy(), train.astype(np.float64).mean(0), rtol=1e-9, atol=1e-9)
    assert layer.in_dim == 1
    off_line = on_line + np.float32(3.0) * np.eye(6, dtype=np.float32)[:1]
    expected, _ = reference_projection(train, off_line, 0.999, centering=True)
    np.testing.assert_allclose(layer(torch.from_numpy(off_line)).numpy(), expected, rtol=1e-4, atol=1e-3)


def test_tokens_are_samples():
    train = low_rank_data(240)
    layer = LinearPCALayer(8, threshold=0.9)
    layer(torch.from_numpy(train).reshape(12, 20, 8))
    layer.eval()
    test = low_rank_data(10, seed=4)
    out = layer(torch.from_numpy(test).reshape(2, 5, 8))
    expected, _ = reference_projection(train, test, 0.9, centering=True)
    assert out.shape == (2, 5, 8)
    np.testing.assert_allclose(out.reshape(10, 8).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_each_training_phase_refits_on_its_own_data():
    first, second = low_rank_data(200, seed=5), low_rank_data(200, seed=6, scales=(1.0, 1.0, 1.0, 1.0, 1.0))
    layer = train_on(LinearPCALayer(8, threshold=0.95), first)
    test = torch.from_numpy(low_rank_data(5, seed=7))
    layer(test)
    train_on(layer, second)
    expected, k = reference_projection(second, test.numpy(), 0.95, centering=True)
    np.testing.assert_allclose(layer(test).numpy(), expected, rtol=1e-4, atol=1e-4)
    assert layer.in_dim == k == 5 and layer.epoch == 2


def test_eval_without_new_data_keeps_the_projection():
    train = low_rank_data(200)
    layer = train_on(LinearPCALayer(8), train)
    test = torch.from_numpy(low_rank_data(5, seed=8))
    first = layer(test)
    layer.train()
    layer.eval()
    assert torch.equal(layer(test), first)


def test_eval_before_training_is_a_clear_error():
    layer = LinearPCALayer(4).eval()
    with pytest.raises(RuntimeError, match=r"training mode \(model.train\(\)\)"):
        layer(torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="no projection yet"):
        Conv2DPCALayer(3, verbose=False).eval()(torch.ones(1, 3, 2, 2))


@pytest.mark.parametrize("keepdim", [True, False])
def test_state_dict_round_trips_the_projection(keepdim):
    train, test = low_rank_data(300), torch.from_numpy(low_rank_data(10, seed=9))
    model = nn.Sequential(nn.Identity(), LinearPCALayer(8, threshold=0.9, keepdim=keepdim))
    train_on(model, train)
    expected = model(test)
    assert {"1.transformation_matrix", "1.mean", "1.eigenvectors", "1.num_components"} <= set(model.state_dict())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = nn.Sequential(nn.Identity(), LinearPCALayer(8, threshold=0.5, keepdim=keepdim))
    restored.load_state_dict(torch.load(buffer))
    restored.eval()
    assert restored[1].threshold == 0.9 and restored[1].in_dim == model[1].in_dim
    torch.testing.assert_close(restored(test), expected)


def test_state_dict_restores_centering():
    train, test = low_rank_data(300), torch.from_numpy(low_rank_data(10, seed=10))
    layer = train_on(LinearPCALayer(8, centering=False, threshold=0.9), train)
    layer(test)
    restored = LinearPCALayer(8, centering=True)
    restored.load_state_dict(layer.state_dict())
    assert restored.centering is False
    torch.testing.assert_close(restored.eval()(test), layer(test))


def test_checkpoint_before_evaluation_keeps_the_training_data():
    train, test = low_rank_data(300), low_rank_data(10, seed=14)
    layer = train_on(LinearPCALayer(8, threshold=0.9).train(), train)
    restored = LinearPCALayer(8, threshold=0.9)
    restored.load_state_dict(layer.state_dict())
    expected, k = reference_projection(train, test, 0.9, centering=True)
    np.testing.assert_allclose(restored.eval()(torch.from_numpy(test)).numpy(), expected, rtol=1e-4, atol=1e-4)
    assert restored.in_dim == k


def test_loads_a_delve_0_1_50_state_dict():
    # Layout of delve 0.1.50's LinearPCALayer: the eigendecomposition, its running sums, a
    # shape-[1] threshold and a float32 mean (never updated), but no projection.
    train, test = low_rank_data(300), low_rank_data(10, seed=15)
    x = train.astype(np.float64)
    values, vectors = np.linalg.eigh(x.T @ x / len(x))
    legacy = {
        "eigenvalues": torch.from_numpy(values[::-1].copy()),
        "eigenvectors": torch.from_numpy(vectors[:, ::-1].copy()),
        "_threshold": torch.tensor([0.99], dtype=torch.float64),
        "sum_squares": torch.zeros(8, 8, dtype=torch.float64),
        "seen_samples": torch.zeros(1, dtype=torch.float64),
        "running_sum": torch.zeros(8, dtype=torch.float64),
        "mean": torch.zeros(8),
    }
    layer = LinearPCALayer(8, centering=False)
    layer.load_state_dict(legacy)
    expected, k = reference_projection(train, test, 0.99, centering=False)
    np.testing.assert_allclose(layer.eval()(torch.from_numpy(test)).numpy(), expected, rtol=1e-4, atol=1e-4)
    assert layer.in_dim == k and layer.threshold == 0.99


def test_threshold_setter_recomputes_from_the_same_data():
    train, test = low_rank_data(300), low_rank_data(10, seed=11)
    layer = train_on(LinearPCALayer(8, threshold=0.99), train)
    layer.threshold = 0.6  # fits the data seen in training with the new threshold
    expected, k = reference_projection(train, test, 0.6, centering=True)
    assert layer.in_dim == k
    layer.threshold = 0.99
    layer.threshold = 0.6  # recomputes from the stored eigenvalues
    expected, k = reference_projection(train, test, 0.6, centering=True)
    assert layer.threshold == 0.6 and layer.in_dim == k
    np.testing.assert_allclose(layer(torch.from_numpy(test)).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_centering_setter_refits_the_eigenspace():
    train, test = low_rank_data(300), low_rank_data(10, seed=12)
    layer = train_on(LinearPCALayer(8, threshold=0.99, centering=True), train)
    layer.centering = False
    expected, _ = reference_projection(train, test, 0.99, centering=False)
    np.testing.assert_allclose(layer(torch.from_numpy(test)).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_gradients_flow_through_the_projection():
    layer = train_on(LinearPCALayer(8, threshold=0.9, centering=True), low_rank_data(200))
    x = torch.from_numpy(low_rank_data(3, seed=13)).requires_grad_()
    weights = torch.randn(3, 8)
    (layer(x) * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights @ layer.transformation_matrix.T)


def image_data(batch=6, channels=5, size=8, seed=0):
    """Feature maps whose channels mix three latent maps, plus noise and a per-channel offset."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((channels, 3)) * np.array([4.0, 2.0, 0.5])
    latent = rng.standard_normal((batch, 3, size, size))
    maps = np.einsum("cl,blhw->bchw", mixing, latent) + 0.01 * rng.standard_normal((batch, channels, size, size))
    return (maps + 2.0 * rng.standard_normal(channels)[None, :, None, None]).astype(np.float32)


def channel_samples(maps):
    return maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])


@pytest.mark.parametrize("centering", [True, False])
def test_conv_projection_matches_numpy(centering):
    train, test = image_data(), image_data(batch=2, seed=1)
    layer = Conv2DPCALayer(5, threshold=0.99, centering=centering, verbose=False)
    for batch in np.split(train, 3):
        assert torch.equal(layer(torch.from_numpy(batch)), torch.from_numpy(batch))
    out = layer.eval()(torch.from_numpy(test))
    expected, k = reference_projection(channel_samples(train), channel_samples(test), 0.99, centering)
    assert out.shape == test.shape and layer.in_dim == k
    np.testing.assert_allclose(channel_samples(out.numpy()), expected, rtol=1e-4, atol=1e-4)


def test_conv_downsampling_accumulates_the_resized_maps_and_projects_full_size():
    train, test = image_data(size=8), image_data(batch=2, size=8, seed=2)
    layer = Conv2DPCALayer(5, threshold=0.9, downsampling=4, centering=True, verbose=False)
    layer(torch.from_numpy(train))
    out = layer.eval()(torch.from_numpy(test))
    # Nearest-neighbour resizing from 8 to 4 keeps every second pixel.
    expected, _ = reference_projection(channel_samples(train[:, :, ::2, ::2]), channel_samples(test), 0.9, True)
    assert out.shape == (2, 5, 8, 8)
    np.testing.assert_allclose(channel_samples(out.numpy()), expected, rtol=1e-4, atol=1e-4)


def test_conv_state_dict_round_trip():
    layer = Conv2DPCALayer(5, threshold=0.9, centering=True, verbose=False)
    layer(torch.from_numpy(image_data()))
    test = torch.from_numpy(image_data(batch=2, seed=3))
    expected = layer.eval()(test)
    restored = Conv2DPCALayer(5, verbose=False)
    restored.load_state_dict(layer.state_dict())
    torch.testing.assert_close(restored.eval()(test), expected)


def pca_network():
    return nn.Sequential(
        Conv2DPCALayer(5, threshold=0.99, verbose=False),
        nn.Flatten(),
        nn.Linear(5 * 8 * 8, 8),
        LinearPCALayer(8, threshold=0.99),
    )


def test_change_all_thresholds_reports_every_layer():
    network = pca_network()
    maps = image_data()
    network(torch.from_numpy(maps))
    network.eval()(torch.from_numpy(maps))
    hidden = network[2](network[1](network[0](torch.from_numpy(maps)))).detach().numpy()
    sat, in_dims, fs_dims, names = change_all_pca_layer_thresholds(0.8, network)
    _, _, k_conv = reference_basis(channel_samples(maps), 0.8, centering=False)
    _, _, k_lin = reference_basis(hidden, 0.8, centering=True)
    assert names == ["Conv-0", "Lin-0"]
    assert in_dims == [k_conv, k_lin] and fs_dims == [5, 8]
    assert sat == [round(100 * k_conv / 5, 4), round(100 * k_lin / 8, 4)]
    assert all(layer.threshold == 0.8 for layer in (network[0], network[3]))


def test_inject_random_directions_keeps_the_rank_and_changes_the_subspace():
    network = pca_network()
    maps = torch.from_numpy(image_data())
    network(maps)
    network.eval()(maps)
    real = network[0].transformation_matrix.clone()
    np.random.seed(0)
    sat, in_dims, fs_dims, names = change_all_pca_layer_thresholds_and_inject_random_directions(
        0.9, network, include_names=True
    )
    assert names == ["Conv-0", "Lin-0"] and fs_dims == [5, 8]
    for layer, k in zip((network[0], network[3]), in_dims):
        projector = layer.transformation_matrix.double()
        torch.testing.assert_close(projector @ projector, projector, atol=1e-5, rtol=0)
        torch.testing.assert_close(projector, projector.T)
        assert round(float(torch.trace(projector))) == k == layer.in_dim
    assert not torch.allclose(network[0].transformation_matrix, real, atol=1e-3)
    out = network[0](maps)
    expected = np.einsum("dc,bchw->bdhw", network[0].transformation_matrix.numpy(), maps.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert len(change_all_pca_layer_thresholds_and_inject_random_directions(0.9, network)) == 3


def test_inject_random_directions_needs_a_projection():
    with pytest.raises(RuntimeError, match="train the network"):
        change_all_pca_layer_thresholds_and_inject_random_directions(0.9, pca_network())


def test_change_all_centering_and_downsampling():
    network = pca_network()
    change_all_pca_layer_centering(True, network, downsampling=4)
    assert network[0].centering and network[3].centering and network[0].downsampling == 4
    change_all_pca_layer_centering(False, network)
    assert not network[0].centering and network[0].downsampling == 4


def test_rvs_is_a_rotation():
    for dim in (1, 2, 7):
        q = rvs(dim, random_state=dim)
        np.testing.assert_allclose(q.T @ q, np.eye(dim), atol=1e-12)
        assert np.linalg.det(q) == pytest.approx(1.0)
    np.random.seed(1)
    first = rvs(5)
    np.random.seed(1)
    np.testing.assert_array_equal(first, rvs(5))
    assert rvs().shape == (3, 3)


def test_rvs_is_uniform_on_average():
    # The mean of Haar-distributed rotations in 3-D is the zero matrix.
    rng = np.random.default_rng(0)
    mean = np.mean([rvs(3, random_state=rng) for _ in range(1000)], axis=0)
    assert np.abs(mean).max() < 0.1


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: LinearPCALayer(0), "in_features"),
        (lambda: LinearPCALayer(4, threshold=0.0), "threshold"),
        (lambda: LinearPCALayer(4, threshold=1.5), "threshold"),
        (lambda: Conv2DPCALayer(4, downsampling=0), "downsampling"),
        (lambda: rvs(0), "dim"),
    ],
)
def test_bad_arguments_name_the_parameter(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_wrong_input_shape_is_reported():
    with pytest.raises(ValueError, match="expects 4 features"):
        LinearPCALayer(4)(torch.ones(2, 3))
    with pytest.raises(ValueError, match="height, width"):
        Conv2DPCALayer(4, verbose=False)(torch.ones(2, 4))


def test_evaluation_under_inference_mode_then_more_training():
    # Lightning validates under torch.inference_mode(); training must go on afterwards.
    first, second = low_rank_data(200, seed=16), low_rank_data(200, seed=17)
    layer = train_on(LinearPCALayer(8, threshold=0.9), first)
    test = torch.from_numpy(low_rank_data(5, seed=18))
    with torch.inference_mode():
        layer(test)
    train_on(layer, second)
    with torch.inference_mode():
        out = layer(test)
    expected, _ = reference_projection(second, test.numpy(), 0.9, centering=True)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)
