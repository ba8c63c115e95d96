"""python -m ddpmlab.hub against the real diffusers: the released architectures give diffusers' outputs, a round trip
keeps every tensor's bytes, an exported run samples diffusers' images, and bad sources are one line, exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpmlab.diffusion.samplers import ancestral
from ddpmlab.errors import ConfigError
from ddpmlab.evaluation import load_run
from ddpmlab.hub import export_pipeline, import_checkpoint
from ddpmlab.hub.convert import LEGACY_ATTENTION
from ddpmlab.training import build, train
from tests.conftest import ROOT, compose_config
from tests.test_data import write_mnist_like

diffusers = pytest.importorskip("diffusers")

# unet/config.json of google/ddpm-cifar10-32 and google/ddpm-celebahq-256 as the Hub has them (diffusers 0.0.4's
# fields; every other field takes UNet2DModel's default, as diffusers itself reads them).
RELEASED = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
            "center_input_sample": False, "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
            "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
            "norm_num_groups": 32, "out_channels": 3, "time_embedding_type": "positional"}
CIFAR10 = {**RELEASED, "sample_size": 32, "block_out_channels": [128, 256, 256, 256],
           "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
CELEBAHQ = {**RELEASED, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
            "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}
PAPER_SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
                   "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
                   "trained_betas": None, "variance_type": "fixed_large"}
# A small network with every option diffusers and we share: scale-shift norm, 4 heads, learned-range variance,
# v prediction and the cosine schedule (squaredcos_cap_v2); 1x28x28, so it evaluates on Fashion-MNIST's format.
TINY = {"_class_name": "UNet2DModel", "sample_size": 28, "in_channels": 1, "out_channels": 2,
        "block_out_channels": [32, 64], "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 16, "norm_eps": 1e-6,
        "resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 32, "downsample_padding": 0}
TINY_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                  "variance_type": "learned_range", "prediction_type": "v_prediction", "clip_sample": True}


def write_folder(folder: Path, unet_config: dict, scheduler_config: dict | None, seed: int = 0,
                 legacy: bool = False) -> Path:
    """A diffusers folder with random weights: UNet2DModel built from `unet_config` by diffusers (its defaults for
    the fields left out), every parameter drawn at random; a pipeline folder, or a bare UNet's without a scheduler.
    `legacy`: the weights as a .bin with the attention names of diffusers < 0.14 (query, key, value, proj_attn)."""
    from diffusers import UNet2DModel
    from safetensors.torch import save_file

    unet = UNet2DModel.from_config(unet_config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in unet.state_dict().items():  # GroupNorm gains near 1, the rest ~ N(0, 1/fan_in)
        noise = torch.randn(tensor.shape, generator=generator)
        state[name] = 1 + 0.1 * noise if "norm" in name and name.endswith("weight") else noise / tensor[0].numel() ** 0.5
    unet_dir = folder / "unet" if scheduler_config is not None else folder
    unet_dir.mkdir(parents=True)
    (unet_dir / "config.json").write_text(json.dumps(unet_config))
    if legacy:
        torch.save({legacy_name(n): t for n, t in state.items()}, unet_dir / "diffusion_pytorch_model.bin")
    else:
        save_file(state, unet_dir / "diffusion_pytorch_model.safetensors")
    if scheduler_config is not None:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
        (folder / "model_index.json").write_text(json.dumps(
            {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
    return folder


def legacy_name(name: str) -> str:
    """to_q -> query, ..., to_out.0 -> proj_attn: diffusers' attention names before 0.14."""
    for old, new in LEGACY_ATTENTION.items():
        name = name.replace(f".{new}.", f".{old}.") if ".attentions." in name else name
    return name


def hub(*args, env: dict | None = None, wait: bool = True):
    """python -m ddpmlab.hub ARGS as a process (started; finished when `wait`)."""
    process = subprocess.Popen([sys.executable, "-m", "ddpmlab.hub", *map(str, args)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return process.communicate(timeout=300) + (process.returncode,) if wait else process


def largest_difference(ckpt: Path, folder: Path, batch: int, t: list[int]) -> float:
    """max |ours - diffusers| of both networks' outputs on the same x_t and t (diffusers reads the folder itself)."""
    from diffusers import UNet2DModel

    ours, _, cfg = load_run(str(ckpt), use_ema=True)
    theirs = UNet2DModel.from_pretrained(folder / "unet" if (folder / "unet").is_dir() else folder).eval()
    x_t = torch.randn(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size,
                      generator=torch.Generator().manual_seed(1))
    t = torch.tensor(t)
    with torch.no_grad():
        a, b = ours(x_t, t), theirs(x_t, t).sample
    print(f"largest output difference against diffusers: {(a - b).abs().max().item():.3g} (outputs up to "
          f"{b.abs().max().item():.3g})")
    return (a - b).abs().max().item() / b.abs().max().item()


@pytest.mark.slow
def test_the_cifar10_release_gives_diffusers_outputs(tmp_path):
    """The command line on google/ddpm-cifar10-32's layout (a pre-0.14 .bin with the old attention names), at real
    size: the checkpoint's config is the source's, both slots hold the weights, the outputs are diffusers'."""
    folder = write_folder(tmp_path / "ddpm-cifar10-32", CIFAR10, PAPER_SCHEDULER, legacy=True)
    out, err, code = hub("import", folder, "--out", tmp_path / "cifar10.ckpt")
    assert code == 0, err
    assert largest_difference(tmp_path / "cifar10.ckpt", folder, 4, [0, 10, 500, 999]) < 1e-5
    checkpoint = torch.load(tmp_path / "cifar10.ckpt", weights_only=True)
    config, state = checkpoint["config"], checkpoint["state_dict"]
    assert {k: config["model"][k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "norm_eps",
                                             "downsample_padding", "num_heads")} == {
        "ch": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16], "norm_eps": 1e-6,
        "downsample_padding": "same", "num_heads": 1}
    assert config["data"]["dataset"] == "cifar10" and config["diffusion"]["variance"] == "fixed_large"
    # diffusers' config says dropout 0.0 (its default); the paper trained this network with 0.1, as the port gets
    assert config["model"]["dropout"] == 0.1
    assert "model.dropout=0.1 " in out and "(model.dropout=0.1: what Ho et al. trained this network with" in out
    assert config["schedule"] == {"_target_": "ddpmlab.diffusion.schedules.linear_betas", "timesteps": 1000,
                                  "beta_start": 0.0001, "beta_end": 0.02}
    assert all(torch.equal(state[k], state[f"ema_{k}"]) for k in state if k.startswith("model."))
    assert sum(state[k].numel() for k in state if k.startswith("model.")) == 35_746_307  # the paper's 35.7M


@pytest.mark.slow
def test_the_256x256_release_gives_diffusers_outputs(tmp_path):
    folder = write_folder(tmp_path / "ddpm-celebahq-256", CELEBAHQ, {**PAPER_SCHEDULER, "variance_type": "fixed_small"})
    config = import_checkpoint(str(folder), tmp_path / "celebahq.ckpt")
    assert config["model"]["attn_resolutions"] == [16] and config["model"]["ch_mult"] == [1, 1, 2, 2, 4, 4]
    assert config["model"]["dropout"] == 0.0  # the paper's for 256x256
    assert config["data"]["dataset"] == "image_folder" and config["diffusion"]["variance"] == "fixed_small"
    assert largest_difference(tmp_path / "celebahq.ckpt", folder, 1, [321]) < 1e-5


def ddpm_name(name: str, levels: int) -> str:
    """A diffusers UNet2DModel tensor's name in the PyTorch port of the authors' TensorFlow checkpoints
    (pesser/pytorch_diffusion), written out here apart from ddpmlab.hub's own table."""
    import re

    for theirs, ddpm in (("time_embedding.linear_1", "temb.dense.0"), ("time_embedding.linear_2", "temb.dense.1"),
                         ("conv_norm_out", "norm_out"), ("mid_block.resnets.0", "mid.block_1"),
                         ("mid_block.resnets.1", "mid.block_2"), ("mid_block.attentions.0", "mid.attn_1"),
                         ("down_blocks", "down"), ("resnets", "block"), ("attentions", "attn"),
                         ("downsamplers.0", "downsample"), ("upsamplers.0", "upsample"), ("time_emb_proj", "temb_proj"),
                         ("conv_shortcut", "nin_shortcut"), ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"),
                         ("to_v", "v"), ("to_out.0", "proj_out")):
        name = name.replace(theirs, ddpm)
    # diffusers counts up blocks from the deepest level, the port by level
    return re.sub(r"^up_blocks\.(\d+)", lambda m: f"up.{levels - 1 - int(m.group(1))}", name)


@pytest.mark.slow
def test_a_state_dict_in_the_original_ddpm_names_gives_diffusers_outputs(tmp_path):
    """The authors' network (GroupNorm eps 1e-6, 'SAME' padding, one head) from a state dict in the port's names,
    its attention as 1x1 convs; the image size and variance, which such a file does not hold, from the command."""
    small = {**RELEASED, "sample_size": 28, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64, 64],
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
    folder = write_folder(tmp_path / "diffusers", small, PAPER_SCHEDULER)
    from safetensors.torch import load_file

    state = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    ported = {ddpm_name(n, 3): t[..., None, None] if ".attentions." in n and t.dim() == 2 else t for n, t in state.items()}
    assert {"temb.dense.0.weight", "down.1.attn.0.q.weight", "mid.attn_1.proj_out.weight", "up.1.attn.2.k.bias",
            "down.0.downsample.conv.weight", "up.2.upsample.conv.weight", "down.1.block.0.nin_shortcut.weight"} <= set(ported)
    torch.save(ported, tmp_path / "model-790000.ckpt")
    with pytest.raises(ConfigError, match="--image-size"):
        import_checkpoint(str(tmp_path / "model-790000.ckpt"), tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
    out, err, code = hub("import", tmp_path / "model-790000.ckpt", "--out", tmp_path / "ported.ckpt",
                         "--image-size", 28, "--variance", "fixed_large")
    assert code == 0, err
    assert largest_difference(tmp_path / "ported.ckpt", folder, 2, [1, 600]) < 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("hub") / "tiny", TINY, TINY_SCHEDULER)


def test_export_of_an_import_keeps_every_tensor_byte_for_byte(tiny, tmp_path):
    """Multi-head attention, scale-shift norm, learned-range v prediction on the cosine schedule: there and back."""
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    import_checkpoint(str(tiny), tmp_path / "tiny.ckpt")
    assert largest_difference(tmp_path / "tiny.ckpt", tiny, 2, [0, 999]) < 1e-5
    export_pipeline(str(tmp_path / "tiny.ckpt"), tmp_path / "back")
    source = load_file(tiny / "unet" / "diffusion_pytorch_model.safetensors")
    back = load_file(tmp_path / "back" / "unet" / "diffusion_pytorch_model.safetensors")
    assert source.keys() == back.keys()
    assert all(source[k].dtype == back[k].dtype and source[k].numpy().tobytes() == back[k].numpy().tobytes()
               for k in source)
    config = json.loads((tmp_path / "back" / "unet" / "config.json").read_text())
    assert {k: config[k] for k in TINY if not k.startswith("_")} == {k: v for k, v in TINY.items() if k[0] != "_"}
    theirs, ours = DDPMScheduler.from_pretrained(tiny / "scheduler"), DDPMScheduler.from_pretrained(tmp_path / "back" / "scheduler")
    assert (ours.variance_type, ours.config.prediction_type) == ("learned_range", "v_prediction")
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-6, atol=1e-7)  # cosine as betas
    again = import_checkpoint(str(tmp_path / "back"), tmp_path / "again.ckpt")  # trained_betas in: the same float64 betas
    assert again["schedule"]["_target_"] == "ddpmlab.diffusion.schedules.given_betas"
    assert torch.equal(load_run(str(tmp_path / "again.ckpt"), True)[1].betas64, load_run(str(tmp_path / "tiny.ckpt"), True)[1].betas64)


@pytest.mark.slow
def test_an_exported_run_samples_our_images_in_diffusers_pipeline(tmp_path):
    """A trained smoke run exported by the command line; DDPMPipeline draws the same initial and per-step noise from
    one generator as our ancestral sampler, so the images agree to float32 rounding."""
    from diffusers import DDPMPipeline

    train(compose_config("experiment=smoke", "trainer.max_steps=3", "callbacks.sample_grid=null", output_dir=tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out, err, code = hub("export", ckpt, "--out", tmp_path / "pipeline")
    assert code == 0, err
    call = f"DDPMPipeline.from_pretrained({str(tmp_path / 'pipeline')!r})(batch_size=16, num_inference_steps=50)"
    assert call in out  # the smoke run's T: the call that samples as ours
    assert sorted(p.name for p in (tmp_path / "pipeline").iterdir()) == ["model_index.json", "scheduler", "unet"]
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    model, diffusion, _ = load_run(str(ckpt), use_ema=True)
    theirs = pipeline(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=50,
                      output_type="pt").images
    ours = (ancestral(model, diffusion, (3, 1, 28, 28), torch.Generator().manual_seed(7)) + 1) / 2
    print(f"largest image difference against DDPMPipeline: {(ours - theirs).abs().max().item():.3g}")
    assert (ours - theirs).abs().max() < 1e-4 and ours.std() > 0.05


@pytest.mark.slow
def test_bad_sources_and_an_offline_push_are_one_line_exit_2_and_write_nothing(tiny, tmp_path):
    missing = tmp_path / "missing_config"
    missing.mkdir()
    (missing / "diffusion_pytorch_model.safetensors").write_bytes((tiny / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    other = write_folder(tmp_path / "conditional", {**TINY, "_class_name": "UNet2DConditionModel", "cross_attention_dim": 64}, None)
    corrupt = write_folder(tmp_path / "corrupt", TINY, TINY_SCHEDULER)
    weights = corrupt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    unreachable = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}  # a closed port
    cases = {"config.json": (missing, {}), "_class_name": (other, {}), "cannot be read": (corrupt, {}),
             "copy the folder from": ("hf://google/ddpm-cifar10-32", offline),
             "pass its path": ("hf://google/ddpm-cifar10-32", unreachable)}
    started = {says: hub("import", src, "--out", tmp_path / f"{i}.ckpt", env=env, wait=False)
               for i, (says, (src, env)) in enumerate(cases.items())}
    for says, args in {"required: --out": ["import", tiny], "invalid int value: '32px'": [  # argparse's own checks
            "import", tiny, "--out", tmp_path / "x.ckpt", "--image-size", "32px"], "invalid choice: 'convert'": [
            "convert", tiny]}.items():
        out, err, code = hub(*args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, (says, err)
    import_checkpoint(str(tiny), tmp_path / "tiny.ckpt")
    pushed = hub("export", tmp_path / "tiny.ckpt", "--out", tmp_path / f"{len(cases)}.ckpt", "--push-to-hub",
                 "me/tiny", env=offline, wait=False)
    for i, (says, process) in enumerate([*started.items(), ("export without --push-to-hub", pushed)]):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2 and len(err.strip().splitlines()) == 1 and says in err, (says, err)
        assert not (tmp_path / f"{i}.ckpt").exists() and not list(tmp_path.glob(f".{i}.ckpt*"))


@pytest.mark.parametrize(("key", "value"), [("variance", "learned"), ("prediction", "mean")])
def test_a_setting_diffusers_lacks_is_refused_in_one_line(tiny, tmp_path, key, value):
    """A learned variance (not learned_range) read as a log variance here and as a variance in diffusers; a network
    that outputs the posterior mean (Ho et al. Table 2's baseline), which no prediction_type of diffusers reads."""
    import_checkpoint(str(tiny), tmp_path / "tiny.ckpt")
    checkpoint = torch.load(tmp_path / "tiny.ckpt", weights_only=True)
    checkpoint["config"]["diffusion"][key] = value
    torch.save(checkpoint, tmp_path / f"{value}.ckpt")

    with pytest.raises(ConfigError, match=rf"diffusion.{key}='{value}'"):
        export_pipeline(str(tmp_path / f"{value}.ckpt"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_printed_fine_tune_overrides_rebuild_the_imported_betas(tiny, tmp_path):
    """The overrides the import prints, composed as train.py composes them after an experiment that sets its own T,
    give the checkpoint's betas bit for bit: the cosine schedule by its option, and betas diffusers gives only as
    trained_betas (here the sigmoid schedule's) by schedule=given; the composed config passes the schema."""
    from hydra.utils import instantiate

    from ddpmlab import schema
    from ddpmlab.diffusion.schedules import sigmoid_betas
    from ddpmlab.hub.__main__ import same_network

    betas = sigmoid_betas(1000)
    given = write_folder(tmp_path / "given", {**TINY, "out_channels": 1}, {**PAPER_SCHEDULER, "trained_betas": betas.tolist()})
    for src, name in ((tiny, "cosine"), (given, "given")):
        config = import_checkpoint(str(src), tmp_path / f"{name}.ckpt")
        cfg = compose_config("experiment=smoke", *same_network(config), output_dir=tmp_path / name)
        schema.check(cfg, schema.TRAIN, schema.TRAIN_CROSS)
        stored = torch.load(tmp_path / f"{name}.ckpt", weights_only=True)["config"]["schedule"]
        assert cfg.schedule._target_ == stored["_target_"] and cfg.schedule._target_.endswith(f".{name}_betas")
        assert torch.equal(instantiate(cfg.schedule), instantiate(stored))
    assert torch.equal(instantiate(cfg.schedule), betas)
    with pytest.raises(ConfigError, match="schedule.timesteps=50 but schedule.betas lists 1000 betas"):
        build(compose_config("experiment=smoke", *[o for o in same_network(config) if "timesteps" not in o]).schedule)


def test_a_ddpm_port_gets_the_papers_dropout_for_its_image_size():
    """Ho et al. 2020, appendix B: dropout 0.1 on CIFAR-10 (32x32), none on the 256x256 datasets."""
    from ddpmlab.hub.convert import model_from_ddpm

    weights = {"conv_in.weight": torch.zeros(8, 3, 3, 3), "down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
               "conv_out.weight": torch.zeros(3, 8, 3, 3)}
    assert model_from_ddpm(weights, 32)["dropout"] == 0.1 and model_from_ddpm(weights, 256)["dropout"] == 0.0


def test_old_scheduler_fields_diffusers_ignores_are_accepted_only_at_their_no_op_values():
    """diffusers 0.0-0.8 wrote timestep_values, timesteps and predict_epsilon, which today's DDPMScheduler drops:
    at their no-op values they change nothing (in diffusers, nor here); at another value they are refused."""
    from diffusers import DDPMScheduler

    from ddpmlab.hub.convert import diffusion_from_scheduler

    old = {**PAPER_SCHEDULER, "timestep_values": None, "timesteps": 1000, "predict_epsilon": True, "tensor_format": "np"}
    assert diffusion_from_scheduler(old) == diffusion_from_scheduler(PAPER_SCHEDULER)
    theirs, today = DDPMScheduler.from_config(old), DDPMScheduler.from_config(PAPER_SCHEDULER)
    assert torch.equal(theirs.alphas_cumprod, today.alphas_cumprod) and theirs.config.prediction_type == "epsilon"
    for field, value in (("timestep_values", [999, 998]), ("timesteps", 500), ("predict_epsilon", False)):
        with pytest.raises(ConfigError, match=f"^{field}="):
            diffusion_from_scheduler({**PAPER_SCHEDULER, field: value})


def test_a_bare_unet_folder_needs_its_variance(tiny, tmp_path):
    """No scheduler/: DDPMScheduler's defaults would say fixed_small, google/ddpm-cifar10-32 is fixed_large."""
    bare = write_folder(tmp_path / "bare", {**TINY, "out_channels": 1}, None)
    with pytest.raises(ConfigError, match="--variance=None: .* pass --variance fixed_large"):
        import_checkpoint(str(bare), tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
    config = import_checkpoint(str(bare), tmp_path / "bare.ckpt", variance="fixed_large")
    assert config["diffusion"]["variance"] == "fixed_large" and config["schedule"]["beta_end"] == 0.02
    with pytest.raises(ConfigError, match="--variance"):  # a pipeline folder's scheduler says it
        import_checkpoint(str(tiny), tmp_path / "y.ckpt", variance="fixed_large")


@pytest.mark.slow
def test_evaluate_scores_an_imported_checkpoint(tiny, tmp_path):
    """evaluate.py on an imported checkpoint, as a process: its stored config rebuilds the network and data."""
    import_checkpoint(str(tiny), tmp_path / "tiny.ckpt")
    write_mnist_like(tmp_path / "data" / "FashionMNIST" / "raw", n_train=8, n_test=4)
    done = subprocess.run([sys.executable, "evaluate.py", f"ckpt={tmp_path / 'tiny.ckpt'}", "metrics=[nll_estimate]",
                           "nll_estimate.num_images=4", "nll_estimate.timesteps=2", f"data_root={tmp_path / 'data'}",
                           f"hydra.run.dir={tmp_path / 'eval'}"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["results"][0]["metric"] == "nll_estimate (bits/dim)" and record["results"][0]["value"] > 0


@pytest.mark.slow
def test_train_fine_tunes_an_imported_checkpoint_and_init_from_refuses_another_network(tiny, tmp_path):
    """`train.py ckpt_path=OUT.ckpt` with the overrides the import prints trains from the weights at step 0; a
    network that differs only where shapes do not show (norm_eps) is refused in one line."""
    from ddpmlab.hub.__main__ import same_network

    overrides = same_network(import_checkpoint(str(tiny), tmp_path / "tiny.ckpt"))
    write_mnist_like(tmp_path / "data" / "FashionMNIST" / "raw", n_train=8, n_test=4)
    common = [f"data.root={tmp_path / 'data'}", "data.batch_size=4", "trainer.max_steps=2", "val.num_images=4",
              "callbacks.sample_grid=null"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def train_py(*args):
        return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                              env=env, timeout=300)

    # another recipe than the import's stored one (optim, dropout): weights carry no recipe to continue
    done = train_py(f"ckpt_path={tmp_path / 'tiny.ckpt'}", *overrides, *common, "optim.lr=2e-4", "optim.warmup_steps=5",
                    "model.dropout=0.1", f"hydra.run.dir={tmp_path / 'ft'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "holds weights only: training starts at step 0" in done.stdout + done.stderr
    assert torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2

    other = [o for o in overrides if not o.startswith("model.norm_eps=")]
    refused = train_py(f"init_from={tmp_path / 'tiny.ckpt'}", *other, *common, f"hydra.run.dir={tmp_path / 'bad'}")
    assert refused.returncode == 2 and not (tmp_path / "bad").exists(), refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1].endswith("add the override(s) model.norm_eps=1e-06")


def test_a_conditional_run_exports_its_class_embedding_and_imports_back_exactly(tmp_path):
    """model.num_classes=10 is UNet2DModel's num_class_embeds=11 (the 10 classes and "no class"): diffusers' network
    given class_labels computes ours given y; the import gives back every tensor, the class count and names."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    train(compose_config("experiment=smoke", "model.num_classes=10", "trainer.max_steps=3", "callbacks.sample_grid=null",
                         output_dir=tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out, err, code = hub("export", ckpt, "--out", tmp_path / "pipeline")
    assert code == 0 and "class_labels=y" in out and "s = 1 + w" in out, err
    theirs = UNet2DModel.from_pretrained(tmp_path / "pipeline" / "unet").eval()
    assert theirs.config.num_class_embeds == 11 and theirs.class_embedding.weight.shape == (11, 128)
    ours, _, cfg = load_run(str(ckpt), use_ema=True)
    x_t, t, y = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 7, 20, 49]), \
        torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        a, b = ours(x_t, t, y), theirs(x_t, t, class_labels=y).sample
        other = theirs(x_t, t, class_labels=torch.tensor([1, 4, 8, 2])).sample
    assert (a - b).abs().max() <= 1e-5 * b.abs().max() and not torch.allclose(b, other)  # the label matters
    config = import_checkpoint(str(tmp_path / "pipeline"), tmp_path / "back.ckpt")
    assert config["model"]["num_classes"] == 10 and config["data"]["class_names"] == cfg.data.class_names
    source, back = (torch.load(p, weights_only=True)["state_dict"] for p in (ckpt, tmp_path / "back.ckpt"))
    assert all(torch.equal(source[f"ema_model.{k}"], v) for k, v in
               ((k.removeprefix("model."), v) for k, v in back.items() if k.startswith("model.")))
    export_pipeline(str(tmp_path / "back.ckpt"), tmp_path / "again")
    first, again = (load_file(p / "unet" / "diffusion_pytorch_model.safetensors") for p in (tmp_path / "pipeline", tmp_path / "again"))
    assert first.keys() == again.keys() and all(first[k].numpy().tobytes() == again[k].numpy().tobytes() for k in first)


def test_a_class_embedding_we_did_not_write_needs_its_no_class_label_said(tmp_path):
    """diffusers' num_class_embeds says how many labels, not which is "no class" (ours is the last); a class embedding
    of another kind (class_embed_type) has no equivalent."""
    foreign = write_folder(tmp_path / "foreign", {**TINY, "num_class_embeds": 11}, TINY_SCHEDULER)
    out, err, code = hub("import", foreign, "--out", tmp_path / "a.ckpt")
    assert code == 2 and err.count("\n") == 1 and "num_class_embeds=11" in err and "pass --num-classes 10" in err, err
    with pytest.raises(ConfigError, match=r"num_class_embeds=11: 4 classes and \"no class\" are 5 labels, not 11"):
        import_checkpoint(str(foreign), tmp_path / "b.ckpt", num_classes=4)
    config = import_checkpoint(str(foreign), tmp_path / "c.ckpt", num_classes=10)
    from diffusers import UNet2DModel

    ours, theirs = load_run(str(tmp_path / "c.ckpt"), True)[0], UNet2DModel.from_pretrained(foreign / "unet").eval()
    x_t, t, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 500, 999]), torch.tensor([2, 9, 10])
    with torch.no_grad():
        a, b = ours(x_t, t, y), theirs(x_t, t, class_labels=y).sample
    assert config["model"]["num_classes"] == 10 and (a - b).abs().max() <= 1e-5 * b.abs().max()
    timestep = write_folder(tmp_path / "timestep", {**TINY, "class_embed_type": "timestep"}, TINY_SCHEDULER)
    with pytest.raises(ConfigError, match=r"class_embed_type='timestep': our U-Net has no equivalent"):
        import_checkpoint(str(timestep), tmp_path / "d.ckpt")
    assert not any(tmp_path.glob("[abd].ckpt"))
