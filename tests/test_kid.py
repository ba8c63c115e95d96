"""KID's statistic and its standard error: the unbiased MMD^2 of Binkowski et al. 2018 under the cubic kernel."""

import numpy as np
import torch
from torch_fidelity.metric_kid import mmd2

from ddpmlab.metrics.fidelity import kid_standard_error, mmd2_unbiased


def test_the_statistic_is_torch_fidelitys_unbiased_mmd2_on_the_whole_sets():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(70, 8, generator=generator), torch.randn(70, 8, generator=generator) + 0.3  # theirs: equal sizes
    d = x.shape[1]
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    x64, y64 = x.double().numpy(), y.double().numpy()
    expected = mmd2(kernel(x64, x64), kernel(x64, y64), kernel(y64, y64))
    assert np.isclose(mmd2_unbiased(x, y), expected, rtol=1e-10)


def test_the_standard_error_covers_the_truth_at_its_stated_rate():
    """Two sets from the same Gaussian (true KID 0): over 200 draws, |KID| / SE above 2 about 5% of the time
    (a t distribution with 9 degrees of freedom: 7.7%). Between different distributions (a shift), where the
    statistic is not degenerate, the error shrinks as 1/sqrt(samples): 4x the samples, half the error."""
    generator = torch.Generator().manual_seed(1)
    z = []
    for _ in range(200):
        x, y = torch.randn(200, 4, generator=generator), torch.randn(200, 4, generator=generator)
        estimates = [mmd2_unbiased(x[b * 20:(b + 1) * 20], y[b * 20:(b + 1) * 20]) for b in range(10)]
        z.append(abs(np.mean(estimates)) / kid_standard_error(x, y))
    assert 0.02 < np.mean(np.array(z) > 2) < 0.16
    errors = {n: np.median([kid_standard_error(torch.randn(n, 4, generator=generator),
                                               torch.randn(n, 4, generator=generator) + 0.5) for _ in range(30)])
              for n in (200, 800)}
    assert 1.5 < errors[200] / errors[800] < 2.7
    assert kid_standard_error(torch.randn(15, 4), torch.randn(100, 4)) is None  # fewer than 2 images a block
