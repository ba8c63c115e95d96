"""The catalogue of bad input (docs/bad_input.md): each case as a real process, one line, exit 2, nothing lost.

All cases run once, two processes at a time (one thread each), in a module fixture; each parametrized test then
checks its own case: the exit code, the last stderr line, no traceback, and that nothing earlier changed.
"""

import hashlib
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ddpmlab.checkpoints import AtomicCheckpointIO, load_checkpoint
from ddpmlab.errors import ConfigError
from ddpmlab.training import train
from tests.conftest import ROOT, compose_config

pytestmark = pytest.mark.slow

# (id, script, arguments with {placeholders} filled from the fixture's files, start of the last stderr line)
CASES = [
    ("timesteps_zero", "train", "schedule.timesteps=0", "error: schedule.timesteps must be a positive integer"),
    ("timesteps_not_a_number", "train", "schedule.timesteps=many", "error: schedule.timesteps must be a positive integer"),
    ("batch_size_zero", "train", "data.batch_size=0", "error: data.batch_size must be a positive integer, got 0"),
    ("negative_lr", "train", "optim.lr=-0.001", "error: optim.lr must be a positive number"),
    ("lr_not_a_number", "train", "optim.lr=fast", "error: optim.lr must be a positive number"),
    ("ema_decay_above_one", "train", "optim.ema_decay=1.5", "error: optim.ema_decay must be in [0, 1)"),
    ("unknown_nonfinite_policy", "train", "optim.on_nonfinite=ignore", "error: optim.on_nonfinite='ignore' is unknown"),
    ("unknown_prediction", "train", "diffusion.prediction=score", "error: diffusion.prediction='score' is unknown"),
    ("learned_variance_with_simple_loss", "train", "diffusion.variance=learned_range",
     "error: diffusion.variance=learned_range is trained only by the bound"),
    ("hybrid_loss_with_fixed_variance", "train", "diffusion.loss=hybrid", "error: diffusion.loss=hybrid trains the variance"),
    ("image_size_not_halvable", "train", "data.image_size=27", "error: model: image size 27 cannot be halved"),
    ("channels_not_divisible_by_groups", "train", "model.ch=24", "error: model: channel counts [24, 48]"),
    ("heads_not_dividing_channels", "train", "model.num_heads=3", "error: model.num_heads=3 does not divide"),
    ("unknown_key", "train", "no_such_key=1", "error: Could not override 'no_such_key'."),
    ("unknown_group_option", "train", "model=transformer", "error: In 'config': Could not find 'model/transformer'"),
    ("missing_data_folder", "train", "data=mnist data.root=/nonexistent/folder",
     "error: data.root=/nonexistent/folder does not exist"),
    ("data_root_is_a_file", "train", "data=mnist data.root={file}", "error: data.root={file} is not a folder"),
    ("empty_image_folder", "train", "data=image_folder data.channels=1 data.image_size=28 data.root={empty}",
     "error: data.root={empty} holds no images"),
    ("corrupt_image", "train", "data=image_folder data.channels=1 data.image_size=28 data.root={images}",
     "error: cannot read image {images}/truncated.jpg"),
    ("image_folder_batch_larger_than_its_images", "train",
     "data=image_folder data.channels=1 data.image_size=28 data.root={few} data.test_fraction=0.25",
     "error: data.batch_size must be at most the 3 training images of image_folder data.root={few} (after "
     "data.test_fraction=0.25), got 8: set data.batch_size=3 or less"),
    ("missing_checkpoint", "train", "ckpt_path=/nonexistent/last.ckpt", "error: checkpoint /nonexistent/last.ckpt does not exist"),
    ("corrupt_checkpoint", "train", "ckpt_path={corrupt}", "error: checkpoint {corrupt} cannot be loaded safely"),
    ("malicious_checkpoint", "train", "ckpt_path={malicious}", "error: checkpoint {malicious} cannot be loaded safely"),
    ("checkpoint_of_another_model", "train", "ckpt_path={other}",
     "error: checkpoint {other} does not match the model (missing ema_model.conv_in.bias"),
    ("resume_last_without_runs", "train", "ckpt_path=last", "error: ckpt_path=last: no run of task 'smoke'"),
    ("max_time_zero", "train", "trainer.max_time=00:00:00:00",
     "error: trainer.max_time must be a duration DD:HH:MM:SS above zero (00:00:10:00: ten minutes) or null"),
    ("max_time_in_words", "train", "trainer.max_time=ten_minutes",
     "error: trainer.max_time must be a duration DD:HH:MM:SS above zero"),
    ("optimized_metric_never_logged", "train", "optimized_metric=train/vlb_bpd trainer.log_every_n_steps=10",
     "error: optimized_metric=train/vlb_bpd is logged every trainer.log_every_n_steps=10 steps, and its 6 steps"),
    ("run_folder_already_used", "train", "hydra.run.dir={used}", "error: {used} already holds checkpoints"),
    ("resume_with_other_settings", "train", "ckpt_path={good} schedule=cosine diffusion.prediction=v",
     "error: resuming {good} would change what it was trained as: schedule._target_"),
    ("unwritable_output_folder", "train", "paths.output_dir={file}/run", "error: cannot write to {file}/run (Not a directory)"),
    ("evaluate_unwritable_output_folder", "evaluate", "ckpt={good} metrics=[fid] paths.output_dir={file}/eval",
     "error: cannot write to {file}/eval (Not a directory)"),
    ("evaluate_checkpoint_is_a_folder", "evaluate", "ckpt={run}",
     "error: checkpoint {run} is a folder, not a checkpoint file (the .ckpt files in it: checkpoints/"),
    ("evaluate_missing_checkpoint", "evaluate", "ckpt=/nonexistent/last.ckpt", "error: checkpoint /nonexistent/last.ckpt does not exist"),
    ("evaluate_unknown_metric", "evaluate", "ckpt={good} metrics=[fid,bogus]",
     "error: metrics must be a list of values, each one of nll, nll_estimate, nll_ode, fid, is, kid, rate_distortion, "
     "got ['fid', 'bogus']"),
    ("evaluate_unknown_sampler", "evaluate", "ckpt={good} metrics=[fid] sampler=euler",
     "error: sampler must be one of ancestral, respaced, ddim, dpm_solver, heun, edm or a list"),
    ("evaluate_steps_out_of_range", "evaluate", "ckpt={good} metrics=[fid] sampler=ddim sampling_steps=0",
     "error: sampling_steps must be a positive integer or a list"),
    ("evaluate_ancestral_with_fewer_steps", "evaluate", "ckpt={good} metrics=[fid] sampling_steps=10",
     "error: the ancestral sampler runs all T=50 steps"),
    ("evaluate_more_nll_images_than_the_test_split", "evaluate", "ckpt={good} metrics=[nll] nll.num_images=999999",
     "error: nll.num_images=999999 is outside 1..10000"),
    ("evaluate_too_few_samples", "evaluate", "ckpt={good} metrics=[fid] num_samples=1",
     "error: num_samples must be at least 2 for ['fid'], got 1"),
    ("evaluate_edm_negative_churn", "evaluate", "ckpt={good} metrics=[fid] sampler=edm edm.S_churn=-1",
     "error: edm.S_churn must be a number >= 0, got -1"),
    ("evaluate_edm_zero_noise", "evaluate", "ckpt={good} metrics=[fid] sampler=edm edm.S_noise=0",
     "error: edm.S_noise must be a positive number, got 0"),
    ("evaluate_edm_zero_rho", "evaluate", "ckpt={good} metrics=[fid] sampler=heun edm.rho=0",
     "error: edm.rho must be a positive number, got 0"),
    ("evaluate_heun_zero_steps", "evaluate", "ckpt={good} metrics=[fid] sampler=heun sampling_steps=0",
     "error: sampling_steps must be a positive integer or a list"),
    ("evaluate_edm_sigma_range_upside_down", "evaluate", "ckpt={good} metrics=[fid] sampler=heun edm.sigma_min=100",
     "error: edm.sigma_min must be below edm.sigma_max=80.0, got 100"),
    ("evaluate_nll_ode_zero_rtol", "evaluate", "ckpt={good} metrics=[nll_ode] nll_ode.rtol=0",
     "error: nll_ode.rtol must be a positive number, got 0"),
    ("evaluate_nll_ode_negative_atol", "evaluate", "ckpt={good} metrics=[nll_ode] nll_ode.atol=-1e-5",
     "error: nll_ode.atol must be a positive number, got -1e-05"),
    ("evaluate_edm_sampler_outside_the_checkpoints_noise_levels", "evaluate",
     "ckpt={good} metrics=[fid] sampler=heun edm.sigma_min=200 edm.sigma_max=300",
     "error: the checkpoint's noise levels sigma in [0.01, 0.8"),
    ("evaluate_ddpm_sampler_on_an_edm_checkpoint", "evaluate", "ckpt={edm} metrics=[fid] sampler=ddim sampling_steps=10",
     "error: sampler=ddim is a discrete-time DDPM sampler, and this is an EDM checkpoint"),
    ("evaluate_full_bound_of_an_edm_checkpoint", "evaluate", "ckpt={edm} metrics=[nll]",
     "error: metrics=[nll] is the bound over the T steps of a discrete-time checkpoint, and this is an EDM checkpoint"),
    ("edm_run_with_a_ddpm_sample_grid", "train", "diffusion=edm",
     "error: callbacks.sample_grid.sampler must be one of heun, edm for diffusion=edm"),
    ("evaluate_figure_t_outside_the_chain", "evaluate", "ckpt={good} metrics=[] figures=[shared_latent] "
     "shared_latent.t=[51,25]", "error: shared_latent.t=[51, 25] is outside [1, T=50], the checkpoint's timesteps"),
    ("evaluate_lambda_outside_0_1", "evaluate", "ckpt={good} metrics=[] figures=[interpolation] "
     "interpolation.lambdas=[0,1.5]", "error: interpolation.lambdas must be a list of one or more values, each in "
     "[0, 1], got [0, 1.5]"),
    ("evaluate_unknown_figure", "evaluate", "ckpt={good} metrics=[] figures=[bogus]",
     "error: figures must be a list of values, each one of progressive, shared_latent, interpolation, "
     "coarse_to_fine, got ['bogus']"),
    ("evaluate_more_figure_images_than_the_test_split", "evaluate", "ckpt={good} metrics=[] figures=[interpolation] "
     "interpolation.pairs=6000", "error: interpolation.pairs needs 12000 test images and the test split holds 10000"),
    ("evaluate_nothing_to_do", "evaluate", "ckpt={good} metrics=[]",
     "error: metrics must be one metric or more when figures=[] (nothing to do)"),
    ("evaluate_without_a_checkpoint", "evaluate", "metrics=[nll]", "error: ckpt is required and has no value"),
    ("evaluate_table_without_a_sweep", "evaluate", "ckpt={good} table=paper_table2",
     "error: sweep_dir must be a sweep folder for table=paper_table2"),
    ("evaluate_sweep_dir_not_a_folder", "evaluate", "sweep_dir={file} table=paper_table2",
     "error: sweep_dir={file} is not a folder"),
    ("conditional_model_on_images_without_class_folders", "train",
     "model.num_classes=2 data=image_folder data.channels=1 data.image_size=28 data.root={few}",
     "error: model.num_classes=2 needs class labels, and image_folder data.root={few} has none: put each class's "
     "images in a folder of its own, data.root/<class>/"),
    ("num_classes_other_than_the_datas", "train", "model.num_classes=5",
     "error: model.num_classes=5 but fashion_mnist data.root="),
    ("cond_drop_prob_of_one", "train", "diffusion.cond_drop_prob=1",
     "error: diffusion.cond_drop_prob must be in [0, 1), got 1: Ho & Salimans use 0.1 or 0.2"),
    ("grid_guidance_of_an_unconditional_run", "train", "callbacks.sample_grid.guidance_scale=2",
     "error: callbacks.sample_grid.guidance_scale must be null for this run, which is unconditional "
     "(model.num_classes=null), got 2: drop callbacks.sample_grid.guidance_scale, or set model.num_classes=N"),
    ("evaluate_guidance_of_an_unconditional_checkpoint", "evaluate", "ckpt={good} guidance_scale=[0,2]",
     "error: guidance_scale must be null for checkpoint {good}, which is unconditional (model.num_classes=null), "
     "got [0, 2]: drop guidance_scale, or train with model.num_classes=N"),
    ("evaluate_labels_outside_the_classes", "evaluate", "ckpt={cond} labels=[3,10]",
     "error: labels must be all or classes in 0..9 (the 10 classes of checkpoint {cond}), got [3, 10]: e.g. "
     "labels=[0,9], or labels=all"),
    ("evaluate_guidance_without_a_trained_no_class", "evaluate", "ckpt={no_drop} guidance_scale=2",
     "error: guidance_scale must be 0 for checkpoint {no_drop}, whose \"no class\" label was never trained "
     "(diffusion.cond_drop_prob=0), got 2: set guidance_scale=0, or train with diffusion.cond_drop_prob=0.1"),
]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """Every case's files, then every case run as a process: {id: (CompletedProcess, last line expected)}."""
    root = tmp_path_factory.mktemp("bad_input")
    files = {"file": root / "a_file.txt", "empty": root / "empty", "images": root / "images",
             "corrupt": root / "corrupt.ckpt", "malicious": root / "malicious.ckpt", "other": root / "other.ckpt",
             "used": root / "used_run", "good": root / "good" / "checkpoints" / "last.ckpt", "run": root / "good",
             "few": root / "few", "edm": root / "edm" / "checkpoints" / "last.ckpt",
             "cond": root / "cond" / "checkpoints" / "last.ckpt", "no_drop": root / "no_drop.ckpt"}
    files["file"].write_text("not a folder")
    files["empty"].mkdir()
    files["images"].mkdir()
    from PIL import Image

    Image.new("L", (28, 28)).save(files["images"] / "ok.png")
    files["few"].mkdir()
    for i in range(4):  # 3 training images once data.test_fraction=0.25 holds one out
        Image.new("L", (28, 28), 60 * i).save(files["few"] / f"{i}.png")
    (files["images"] / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    files["corrupt"].write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4096)))

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'pwned'}",))

    torch.save({"state_dict": {}, "payload": Exploit()}, files["malicious"])
    torch.save({"state_dict": {"model.layer.weight": torch.zeros(3)}}, files["other"])
    (files["used"] / "checkpoints").mkdir(parents=True)
    (files["used"] / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    train(compose_config("experiment=smoke", output_dir=root / "good"))
    train(compose_config("experiment=smoke", "diffusion=edm", "callbacks.sample_grid.sampler=heun", "val.num_images=0",
                         "optimized_metric=null", output_dir=root / "edm"))
    train(compose_config("experiment=smoke", "model.num_classes=10", "trainer.max_steps=2", "callbacks.sample_grid=null",
                         output_dir=root / "cond"))
    conditional = torch.load(files["cond"], weights_only=True)
    conditional["config"]["diffusion"]["cond_drop_prob"] = 0.0  # as if trained without label dropout
    torch.save(conditional, files["no_drop"])
    before = _fingerprint(root)

    def run(case):
        name, script, args, expected = case
        fill = {k: str(v) for k, v in files.items()}
        argv = [sys.executable, str(ROOT / f"{script}.py"), *args.format(**fill).split()]
        argv += [f"paths.log_dir={root / 'logs'}"] + (["experiment=smoke"] if script == "train" else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        result = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        return name, (result, expected.format(**fill))

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, CASES))
    return {"results": results, "root": root, "before": before, "after": _fingerprint(root),
            "junk": sorted(str(p) for p in (root / "logs").rglob("*") if p.is_dir() and p.parent.name in ("smoke", "eval"))
            if (root / "logs").is_dir() else []}


def _fingerprint(root: Path) -> dict:
    """SHA-256 of every file the fixture made (not logs or evaluation outputs, which runs may add)."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "logs" not in p.parts and "outputs" not in p.parts}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_loses_nothing(catalogue, case):
    result, expected = catalogue["results"][case]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-1500:]
    if expected.startswith("error: "):  # ours: the last line, alone
        assert lines[-1].startswith(expected), result.stderr[-1500:]
    else:  # Hydra's own report of an override it cannot compose
        assert any(line.startswith(expected) for line in lines), result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    for path, digest in catalogue["before"].items():  # every earlier file is byte-identical
        assert catalogue["after"].get(path) == digest, path
    assert not (catalogue["root"] / "pwned").exists()
    assert not catalogue["junk"], "a failed run left its folder behind"


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """The checkpoint writer's temporary file is /dev/full (every write fails with ENOSPC, as on a full disk)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, folder / "last.ckpt")
    digest = hashlib.sha256((folder / "last.ckpt").read_bytes()).hexdigest()
    (folder / f".last.ckpt.{os.getpid()}.tmp").symlink_to("/dev/full")
    with pytest.raises(ConfigError, match=r"cannot write checkpoint .*last.ckpt \(No space left on device\): "
                                          r"the previous checkpoint is kept"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 2}, folder / "last.ckpt")
    assert hashlib.sha256((folder / "last.ckpt").read_bytes()).hexdigest() == digest
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


def test_any_corrupt_bytes_are_refused_as_a_checkpoint(tmp_path):
    """Random bytes break the unpickler in many ways (IndexError, KeyError, UnicodeDecodeError ...): every one of
    them must come out as the one-line refusal, never a traceback."""
    path = tmp_path / "corrupt.ckpt"
    for seed in range(300):
        rng = random.Random(seed)
        head = rng.choice([b"", b"\x80\x02", b"PK\x03\x04", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."])
        path.write_bytes(head + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 600))))
        with pytest.raises(ConfigError, match="cannot be loaded safely|holds no state_dict"):
            load_checkpoint(path)


def test_the_docs_table_lists_every_case():
    table = (ROOT / "docs" / "bad_input.md").read_text()
    for name, script, args, expected in CASES:
        assert f"`{script}.py {args}`" in table, name
