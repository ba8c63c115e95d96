"""The Fréchet distance of two feature sets (FID: Heusel et al. 2017, arXiv 1706.08500, eq. 6), exactly and fast.

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^(1/2))

with mu_i the features' means and S_i their unbiased covariances (ddof 1, as numpy's `cov` and torch-fidelity take
them). torch-fidelity takes Tr((S_1 S_2)^(1/2)) from the general eigenvalues of the D x D product S_1 S_2 (D = 2048
for Inception): ten seconds on a CPU core each time, and, when a set holds fewer than D images (S singular), the
square roots of round-off eigenvalues add noise (FID of a set against itself is not 0).

Here: for any factors F_i with S_i = F_i^T F_i, the nonzero eigenvalues of S_1 S_2 = F_1^T F_1 F_2^T F_2 are those of
(F_1 F_2^T)(F_1 F_2^T)^T, so Tr((S_1 S_2)^(1/2)) is the sum of the singular values of F_1 F_2^T (its nuclear
norm). A set of n <= D images is its own factor: its centred features / sqrt(n - 1) (n x D), so a small set costs
an (n_1 x n_2) SVD and a set against itself gives 0 up to rounding; beside a set of more than D images, the
(n_1 x n_1) symmetric F_1 S_2 F_1^T has the eigenvalues. When both exceed D, any F_1 will do: S_1's Cholesky factor
(S_1 = L L^T, F_1 = L^T), or, for a singular S_1, its symmetric square root from S_1 = V diag(lambda) V^T; the
trace is then the sum of the square roots of the eigenvalues of the symmetric F_1 S_2 F_1^T. A symmetric
eigenvalue problem is several times cheaper than the general one. Everything is float64.
"""

import numpy as np
import torch
from torch import Tensor


def _moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, centred features / sqrt(n - 1)) of (n, D) features: centred^T centred is the unbiased covariance."""
    n = len(features)
    if n < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 feature vectors per set, got {n}")
    mean = features.mean(axis=0)
    return mean, (features - mean) / np.sqrt(n - 1)


def frechet_distance(features_1: Tensor | np.ndarray, features_2: Tensor | np.ndarray) -> float:
    """The Fréchet distance d^2 (module docstring) between the Gaussians fitted to two (n_i, D) feature sets."""
    a, b = (np.asarray(f.detach().to("cpu", torch.float64) if isinstance(f, Tensor) else f, dtype=np.float64)
            for f in (features_1, features_2))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"the Fréchet distance needs two (n, D) feature sets of one D, got {a.shape} and {b.shape}")
    (mu_1, x_1), (mu_2, x_2) = _moments(a), _moments(b)
    trace_1, trace_2 = float(np.einsum("ij,ij->", x_1, x_1)), float(np.einsum("ij,ij->", x_2, x_2))
    diff = mu_1 - mu_2
    return float(diff @ diff + trace_1 + trace_2 - 2 * _trace_sqrt_product(x_1, x_2))


def _trace_sqrt_product(x_1: np.ndarray, x_2: np.ndarray) -> float:
    """Tr((S_1 S_2)^(1/2)) for S_i = x_i^T x_i (module docstring)."""
    if len(x_1) > len(x_2):
        x_1, x_2 = x_2, x_1  # the trace is symmetric in the two sets; x_1 is the smaller
    dim = x_1.shape[1]
    if len(x_2) <= dim:
        return float(np.linalg.svd(x_1 @ x_2.T, compute_uv=False).sum())
    s_2 = x_2.T @ x_2
    if len(x_1) <= dim:
        factor = x_1
    else:
        s_1 = x_1.T @ x_1
        try:
            factor = np.linalg.cholesky(s_1).T
        except np.linalg.LinAlgError:  # singular: the symmetric square root
            eigenvalues, vectors = np.linalg.eigh(s_1)
            factor = (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T
    middle = factor @ s_2 @ factor.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
