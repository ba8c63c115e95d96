"""evaluate.py's part of Ho et al. 2020's analyses: the progressive code's rate and distortion (section 4.3) from the
bound's terms, and which figures (ddpmlab.figures) a config asks for, checked before any network call."""

import torch
from omegaconf import OmegaConf

from ddpmlab.errors import ConfigError
from ddpmlab.eval_plan import sampling_settings
from ddpmlab.figures import FIGURES, default_t

PIXEL_SCALE = 127.5  # [-1, 1] -> [0, 255]: the paper's distortion is an RMSE on the 0-255 scale


def rate_distortion(prior, terms, x0_mse) -> dict:
    """Ho et al. section 4.3: the bound as a progressive lossy code (Algorithms 3-4, Figure 5, Table 1), from
    GaussianDiffusion.calc_bpd_loop's exact terms of n test images (prior (n,), terms and x0_mse (n, T)).

    Algorithm 3 sends x_T with L_T bits/dim, then each x_t (t = T-1 .. 1) with L_t = KL(q(x_t | x_{t+1}, x_0) ||
    p(x_t | x_{t+1})), then x_0 with L_0 = -log p(x_0 | x_1). A receiver holding x_t has been sent
        rate(t) = L_T + sum_{s=t}^{T-1} L_s              (bits/dim; rate(T) = L_T)
    and estimates x^_0 from x_t (eq. 15), with
        distortion(t) = sqrt(||x_0 - x^_0||^2 / D) on the [0, 255] scale,
    each averaged over the images (x^_0 from the x_t ~ q(x_t | x_0) its bound term used; marginally the x_t of
    Algorithm 3's chain). Table 1 splits the lossless codelength into rate = L_1 + ... + L_T = rate(1) and
    distortion = L_0; they add up to the bound. Lists are indexed by t - 1 (t = 1 .. T).
    """
    prior, terms, x0_mse = (v.double() for v in (prior, terms, x0_mse))
    mean_terms = terms.mean(0)  # L_0, L_1, ..., L_{T-1}
    after = torch.cat([mean_terms[1:].flip(0).cumsum(0).flip(0), mean_terms.new_zeros(1)])  # sum_{s>=t} L_s, t=1..T
    rate = prior.mean() + after
    distortion = (x0_mse.sqrt() * PIXEL_SCALE).mean(0)
    return {"rate_bpd": rate[0].item(), "distortion_bpd": mean_terms[0].item(),
            "bpd": (rate[0] + mean_terms[0]).item(), "rmse_at_t1": distortion[0].item(),
            "rate_per_t": rate.tolist(), "distortion_rmse_per_t": distortion.tolist(), "num_images": len(prior)}


def figure_jobs(cfg, T: int) -> list[tuple[str, str, dict]]:
    """(figure name, file stem, its function's arguments) for each figure cfg.figures names: progressive once per
    sampler x steps setting (`progressive_<sampler>_<steps>` when there are several)."""
    jobs = []
    for name in cfg.figures:
        if name == "progressive":
            settings = sampling_settings(cfg)
            for sampler, steps in settings:
                stem = f"progressive_{sampler}_{steps or 'all'}" if len(settings) > 1 else "progressive"
                jobs.append((name, stem, {"num_rows": cfg.progressive.rows, "columns": cfg.progressive.columns,
                                          "sampler": sampler, "steps": steps, "eta": cfg.eta}))
        elif name == "shared_latent":
            node = cfg.shared_latent
            jobs.append((name, name, {"num_images": node.images, "samples": node.samples,
                                      "t": list(node.t or default_t(name, T))}))
        elif name == "interpolation":
            node = cfg.interpolation
            jobs.append((name, name, {"pairs": node.pairs, "t": node.t or default_t(name, T)[0],
                                      "lambdas": list(node.lambdas)}))
        else:
            jobs.append((name, name, {"t": list(cfg.coarse_to_fine.t or default_t(name, T)),
                                      "lambdas": list(cfg.interpolation.lambdas)}))
    return jobs


def figure_calls(name: str, kwargs: dict, T: int) -> int:
    """Network calls a whole figure costs (for the time estimate)."""
    if name == "progressive":
        return kwargs["num_rows"] * (kwargs["steps"] or T)
    if name == "shared_latent":
        return kwargs["num_images"] * kwargs["samples"] * sum(kwargs["t"])
    if name == "interpolation":
        return kwargs["pairs"] * len(kwargs["lambdas"]) * kwargs["t"]
    return len(kwargs["lambdas"]) * sum(kwargs["t"])


def check_figures(cfg, T: int, test_images: int | None) -> None:
    """What needs the checkpoint's T and its test split, refused before any network call: a t outside [1, T],
    more test images than the split holds (the other rules are the schema's)."""
    unknown = sorted(set(cfg.figures) - set(FIGURES))
    if unknown:
        raise ConfigError(f"figures={list(cfg.figures)} has unknown {unknown}: choose from {', '.join(FIGURES)}")
    keys = {"shared_latent": ("shared_latent.t",), "interpolation": ("interpolation.t",),
            "coarse_to_fine": ("coarse_to_fine.t",)}
    for name in cfg.figures:
        for key in keys.get(name, ()):
            value = _select(cfg, key)
            values = value if isinstance(value, list) else [value]
            if value is not None and not all(1 <= v <= T for v in values):
                raise ConfigError(f"{key}={value} is outside [1, T={T}], the checkpoint's timesteps: give values "
                                  f"from 1 to {T}, or {key}=null for the paper's (scaled to T)")
    needed = {"shared_latent": ("shared_latent.images", cfg.shared_latent.images),
              "interpolation": ("interpolation.pairs", 2 * cfg.interpolation.pairs), "coarse_to_fine": (None, 2)}
    for name in cfg.figures:
        if name in needed and test_images is not None and needed[name][1] > test_images:
            key, count = needed[name]
            fix = (f"set {key}={test_images if key == 'shared_latent.images' else test_images // 2} or fewer" if key
                   else "use a dataset with a test split of 2 images or more")
            raise ConfigError(f"{key or 'figures=[coarse_to_fine]'} needs {count} test images and the test split "
                              f"holds {test_images}: {fix}")


def _select(cfg, key: str):
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
