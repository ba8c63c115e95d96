"""The Fréchet distance (FID's formula) against torch-fidelity's implementation and against closed forms."""

import numpy as np
import pytest
import torch
from scipy import linalg
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from ddpmlab.metrics.frechet import frechet_distance

DIM = 48


def features(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)
    drawn = rng.standard_normal((n, DIM)) @ mixing * scale + rng.standard_normal(DIM)
    return torch.from_numpy(drawn.astype(np.float32))


def torch_fidelity_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    stats = [fid_features_to_statistics(f) for f in (a, b)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


@pytest.mark.parametrize("n_1, n_2", [(400, 300), (30, 400), (400, 30)])
def test_equals_torch_fidelitys_fid_where_its_covariances_are_full_rank(n_1, n_2):
    """Both sets larger than D (the Cholesky path), and one smaller beside one larger (the thin-factor path). 1e-7:
    torch-fidelity takes the means of float32 features in float32 (ours: float64; scipy's test below: 1e-9)."""
    a, b = features(n_1, 0), features(n_2, 1, scale=1.7)
    assert frechet_distance(a, b) == pytest.approx(torch_fidelity_fid(a, b), rel=1e-7)


def test_equals_the_definition_with_scipys_matrix_square_root():
    a, b = features(200, 2), features(300, 3, scale=0.5)
    x, y = a.double().numpy(), b.double().numpy()
    s_1, s_2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = x.mean(0) - y.mean(0)
    expected = diff @ diff + np.trace(s_1 + s_2 - 2 * linalg.sqrtm(s_1 @ s_2).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [5, DIM, 300])
def test_closed_forms_for_sets_smaller_and_larger_than_the_dimension(n):
    """d(A, A) = 0; d(A, A + c) = |c|^2 (a shift moves only the mean); d(A, kA) = (1 - k)^2 (|mu|^2 + Tr S)."""
    a = features(n, 4).double()
    mu, trace = a.mean(0), torch.trace(torch.cov(a.T)).item()
    shift = torch.linspace(-1, 1, DIM, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-9 * trace
    assert frechet_distance(a, a + shift) == pytest.approx(shift.square().sum().item(), rel=1e-9, abs=1e-9 * trace)
    assert frechet_distance(a, 3 * a) == pytest.approx(4 * (mu.square().sum().item() + trace), rel=1e-9)


def test_a_singular_covariance_from_more_images_than_dimensions():
    """Features with dead units (zero variance, as a ReLU layer's can be): Cholesky fails, the square root holds."""
    a = features(300, 5).double()
    a[:, :10] = 0.25
    mu, trace = a.mean(0), torch.trace(torch.cov(a.T)).item()
    assert frechet_distance(a, 2 * a) == pytest.approx(mu.square().sum().item() + trace, rel=1e-7)
    assert frechet_distance(a, features(400, 6)) == pytest.approx(torch_fidelity_fid(a.float(), features(400, 6)),
                                                                   rel=1e-6)


@pytest.mark.parametrize("a, b", [(torch.zeros(1, DIM), torch.zeros(5, DIM)), (torch.zeros(5, DIM), torch.zeros(5, 3)),
                                  (torch.zeros(5), torch.zeros(5, DIM))])
def test_sets_it_cannot_compare_are_refused(a, b):
    with pytest.raises(ValueError, match="Fréchet distance needs"):
        frechet_distance(a, b)
