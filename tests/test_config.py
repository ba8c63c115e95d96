"""Every option of every config group composes, and builds the object it describes."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from ddpmlab.data import DiffusionDataModule
from ddpmlab.diffusion import GaussianDiffusion
from ddpmlab.diffusion.edm import EDMDiffusion
from ddpmlab.models import UNet
from ddpmlab.performance import trainer_precision
from ddpmlab.training import build_module, build_network
from tests.conftest import ROOT, compose_config

GROUPS = ["data", "model", "schedule", "diffusion", "timestep_sampler", "trainer", "logger", "callbacks", "paths",
          "experiment"]
# Options whose images or U-Net need the other side to be at 32x32.
AT_32 = {"data=cifar10": "model=unet_cifar10", "data=image_folder": "model=unet_cifar10",
         "model=unet_cifar10": "data=cifar10"}
# The paper-scale options: an image folder to read, and their U-Nets at ch=32 here (tests/test_presets.py builds
# them at full size).
AT_SCALE = {"model=unet_256": ["data=image_folder", "data.image_size=256", "model.ch=32"],
            "model=unet_imagenet64": ["data=image_folder", "data.image_size=64", "model.ch=32"],
            **{f"experiment={e}": ["model.ch=32"] for e in ("ddpm_celebahq256", "ddpm_lsun_church256",
                                                            "ddpm_lsun_bedroom256", "ddpm_lsun_cat256",
                                                            "iddpm_imagenet64", "iddpm_imagenet64_vlb")},
            "schedule=given": ["schedule.timesteps=3", "schedule.betas=[0.0001,0.01,0.02]"],  # no default betas
            "data=shards": ["data.path=SHARDS", "model.attn_resolutions=[16]"]}  # no default folder (read later)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(override, tmp_path):
    extra = [AT_32[override]] if override in AT_32 else AT_SCALE.get(override, [])[:]
    if override == "data=image_folder" or override in AT_SCALE:
        extra.append(f"data.root={tmp_path}")
    cfg = compose_config(override, *extra, output_dir=tmp_path)
    assert isinstance(instantiate(cfg.data), DiffusionDataModule)
    model, diffusion = build_network(cfg)
    assert isinstance(model, UNet) and isinstance(diffusion, (GaussianDiffusion, EDMDiffusion))
    if isinstance(diffusion, GaussianDiffusion):  # EDM's "timesteps" are strata of its noise distribution
        assert diffusion.num_timesteps == cfg.schedule.timesteps
    for callback in cfg.callbacks.values():
        instantiate(callback)
    # trainer.precision=auto is resolved before the Trainer is built, as train() does (Lightning has no "auto")
    instantiate(cfg.trainer, logger=False, enable_checkpointing=False,
                precision=trainer_precision(cfg.trainer))
    module = build_module(cfg)
    assert module.config["seed"] == cfg.seed
    assert module.timestep_sampler.num_timesteps == diffusion.num_timesteps


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} is empty"
    assert Path(ROOT / "conf" / "hydra" / "default.yaml").is_file()


def test_the_manuals_table_of_groups_names_every_option():
    """docs/configuration.md's table of config groups lists each option of each group (a new preset is named there)."""
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            for group in cells[0].split(","):  # a row may hold several groups: `paths`, `hydra`
                rows[group.strip().strip("`")] = cells[1]
    groups = [p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "hydra"] + ["hydra/launcher"]
    for group in groups:
        missing = [o for o in options(group) if f"`{o}`" not in rows.get(group, "")]
        assert group in rows and not missing, f"docs/configuration.md's table: group {group} lacks {missing}"


def test_paper_recipe_is_the_papers():
    cfg = compose_config("experiment=ddpm_cifar10")
    assert cfg.data.dataset == "cifar10" and cfg.data.batch_size == 128 and cfg.data.random_flip
    assert cfg.schedule._target_.endswith("linear_betas")
    assert (cfg.schedule.timesteps, cfg.schedule.beta_start, cfg.schedule.beta_end) == (1000, 1e-4, 0.02)
    assert cfg.diffusion.prediction == "eps"
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.ema_decay, cfg.optim.ema_warmup) == (2e-4, 5000, 0.9999, False)
    assert cfg.trainer.max_steps == 800_000 and cfg.trainer.gradient_clip_val == 1.0
    assert (cfg.model.ch, list(cfg.model.ch_mult), cfg.model.num_res_blocks) == (128, [1, 2, 2, 2], 2)
    assert list(cfg.model.attn_resolutions) == [16] and cfg.model.dropout == 0.1


def test_iddpm_recipe_is_the_papers():
    """Nichol & Dhariwal 2021's CIFAR-10 setting: learned_range + hybrid, cosine T=4000, the wider U-Net."""
    cfg = compose_config("experiment=iddpm_cifar10")
    assert cfg.schedule._target_.endswith("cosine_betas") and cfg.schedule.timesteps == 4000
    assert (cfg.diffusion.variance, cfg.diffusion.loss, cfg.diffusion.vlb_weight) == ("learned_range", "hybrid", 0.001)
    assert (cfg.model.ch, list(cfg.model.ch_mult), cfg.model.num_res_blocks) == (128, [1, 2, 2, 2], 3)
    assert list(cfg.model.attn_resolutions) == [16, 8] and cfg.model.num_heads == 4 and cfg.model.scale_shift_norm
    assert cfg.model.dropout == 0.3 and cfg.data.batch_size == 128 and cfg.trainer.max_steps == 500_000
    assert (cfg.optim.lr, cfg.optim.ema_decay) == (1e-4, 0.9999)
    model, diffusion = build_network(cfg)
    assert model.conv_out.out_channels == 6  # eps and the variance interpolation v, per RGB channel
    small = compose_config("experiment=iddpm_fashion_mnist")
    default = compose_config()
    assert (small.diffusion.variance, small.diffusion.loss) == ("learned_range", "hybrid")
    assert small.model == default.model and small.optim == default.optim and small.trainer == default.trainer


def test_edm_recipe_is_the_default_runs_budget_with_karras_et_als_training():
    """experiment=edm_fashion_mnist changes only the diffusion (Karras et al. 2022, Table 1) and the grid's sampler."""
    edm, default = compose_config("experiment=edm_fashion_mnist"), compose_config()
    assert (edm.diffusion.sigma_data, edm.diffusion.P_mean, edm.diffusion.P_std) == (0.5, -1.2, 1.2)
    assert (edm.diffusion.sigma_min, edm.diffusion.sigma_max) == (0.002, 80.0)
    for group in ("model", "optim", "trainer", "data", "val", "timestep_sampler"):
        assert edm[group] == default[group], group
    assert (edm.callbacks.sample_grid.sampler, edm.callbacks.sample_grid.sampling_steps) == ("heun", 18)


def test_overrides_reach_the_objects(tmp_path):
    cfg = compose_config("model=unet", "schedule=cosine", "data.batch_size=7", "seed=3", "trainer.max_steps=11",
                         "schedule.timesteps=400", output_dir=tmp_path)
    assert instantiate(cfg.data).batch_size == 7 and cfg.seed == 3
    assert instantiate(cfg.trainer, logger=False, enable_checkpointing=False,
                       precision=trainer_precision(cfg.trainer)).max_steps == 11
    diffusion = instantiate(cfg.diffusion)
    assert diffusion.num_timesteps == 400 and diffusion.betas.max().item() > 0.5  # cosine clips its last betas
