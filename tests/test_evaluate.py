"""evaluate.py end to end on a checkpoint trained in the test and a small dataset written in the real format."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ddpmlab.evaluation import evaluate
from ddpmlab.models import UNet
from ddpmlab.training import train
from tests.conftest import COLLECTIVE_TIMEOUT_S, ROOT, compose_config, wandb_record
from tests.test_data import write_mnist_like

EVAL_CONF = ROOT / "conf"


def compose_eval(*overrides: str, output_dir):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(EVAL_CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke checkpoint (T=50, 6 steps) and a small Fashion-MNIST-format data root (200 train, 40 test)."""
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    write_mnist_like(root / "data" / "FashionMNIST" / "raw", n_train=200, n_test=40)
    labels = rng.integers(0, 10, 200)  # make the classes learnable: class k images are brighter with k
    images = (rng.integers(0, 40, (200, 28, 28)) + labels[:, None, None] * 20).astype(np.uint8)
    from tests.test_data import write_idx

    write_idx(root / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte", images)
    write_idx(root / "data" / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    train(compose_config("experiment=smoke", output_dir=root / "run"))
    return {"ckpt": str(root / "run" / "checkpoints" / "last.ckpt"), "data": str(root / "data"), "root": root}


def test_nll_reports_total_prior_decoder_and_per_t_terms(trained, tmp_path):
    cfg = compose_eval(f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[nll,nll_estimate]",
                       "nll.num_images=6", "nll_estimate.num_images=12", "nll_estimate.timesteps=4",
                       output_dir=tmp_path)
    record = evaluate(cfg)
    nll = record["nll"]
    assert len(nll["terms_bpd"]) == 50 and nll["num_images"] == 6
    assert nll["bpd"] == pytest.approx(nll["prior_bpd"] + sum(nll["terms_bpd"]), rel=1e-5)
    assert nll["decoder_bpd"] == nll["terms_bpd"][0]
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert {r["metric"] for r in on_disk["results"]} == {"nll (bits/dim)", "nll_estimate (bits/dim)"}
    estimate = next(r for r in on_disk["results"] if r["metric"].startswith("nll_estimate"))
    assert estimate["std"] > 0 and estimate["test_images"] == 12
    assert (tmp_path / "nll_per_t.png").stat().st_size > 1000
    assert on_disk["checkpoint_sha256"] and on_disk["seed"] == 0


def test_classifier_fid_is_kid_with_cached_reference_statistics(trained, tmp_path):
    overrides = [f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[fid,kid,is]",
                 "feature_extractor=classifier", "num_samples=12", "sampler=ddim", "sampling_steps=4"]
    record = evaluate(compose_eval(*overrides, output_dir=tmp_path / "a"))
    values = {r["metric"]: r for r in record["results"]}
    assert set(values) == {"fid", "kid", "is"}
    assert values["fid"]["value"] > 0 and values["is"]["value"] >= 1.0
    assert "classifier" in values["fid"]["feature_extractor"]  # never mistaken for Inception FID
    cache = sorted((trained["root"] / "data" / "fidelity" / "cache").iterdir())
    assert cache, "reference statistics are cached"
    stamps = [p.stat().st_mtime_ns for p in cache]
    again = evaluate(compose_eval(*overrides, output_dir=tmp_path / "b"))
    assert [p.stat().st_mtime_ns for p in cache] == stamps  # reused, not recomputed
    assert again["results"][0]["value"] == pytest.approx(values[again["results"][0]["metric"]]["value"])
    samples = torch.load(tmp_path / "a" / "samples.pt")
    assert samples.shape == (12, 1, 28, 28) and samples.dtype == torch.uint8
    assert (tmp_path / "a" / "samples.png").is_file()


def test_fid_against_steps_gives_a_row_per_sampler_and_steps_and_a_plot(trained, tmp_path):
    common = [f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[fid]",
              "feature_extractor=classifier", "num_samples=6"]
    record = evaluate(compose_eval(*common, "sampler=[ddim,dpm_solver]", "sampling_steps=[2,5]",
                                   output_dir=tmp_path / "sweep"))
    rows = {(r["sampler"], r["sampling_steps"]): r["value"] for r in record["results"] if r["metric"] == "fid"}
    assert set(rows) == {("ddim", 2), ("ddim", 5), ("dpm_solver", 2), ("dpm_solver", 5)}
    assert all(v > 0 for v in rows.values()) and rows[("ddim", 5)] != rows[("dpm_solver", 5)]
    # Two steps of DPM-Solver++ are DDIM's: a first-order step, then the jump to sigma = 0 (both return x_0).
    assert rows[("ddim", 2)] == pytest.approx(rows[("dpm_solver", 2)], rel=1e-4)
    assert (tmp_path / "sweep" / "metrics_vs_steps.png").stat().st_size > 1000
    # A sweep's setting is the same evaluation as that setting alone: same images, same FID.
    alone = evaluate(compose_eval(*common, "sampler=dpm_solver", "sampling_steps=5", output_dir=tmp_path / "one"))
    assert torch.equal(torch.load(tmp_path / "sweep" / "samples_dpm_solver_5.pt"), torch.load(tmp_path / "one" / "samples.pt"))
    assert alone["results"][0]["value"] == pytest.approx(rows[("dpm_solver", 5)])


def test_sampling_steps_out_of_range_fail_before_any_work(trained, tmp_path):
    from ddpmlab.errors import ConfigError

    cfg = compose_eval(f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[fid]",
                       "sampler=dpm_solver", "sampling_steps=[2,51]", output_dir=tmp_path / "out")
    with pytest.raises(ConfigError, match=r"sampling_steps=51 must be an integer between 1 and T=50"):
        evaluate(cfg)
    assert not (tmp_path / "out").exists()


def test_learned_variance_checkpoint_gets_its_nll_and_ancestral_samples(trained, tmp_path):
    """An iDDPM model (learned_range, hybrid loss) through the same evaluate(): bound terms use its variances."""
    train(compose_config("experiment=smoke", "diffusion=iddpm", "schedule=cosine", "timestep_sampler=importance",
                         output_dir=tmp_path / "run"))
    cfg = compose_eval(f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"data_root={trained['data']}",
                       "metrics=[nll,fid]", "nll.num_images=3", "feature_extractor=classifier", "num_samples=4",
                       output_dir=tmp_path / "eval")
    record = evaluate(cfg)
    assert len(record["nll"]["terms_bpd"]) == 50 and 0 < record["nll"]["bpd"] < 100
    assert torch.load(tmp_path / "eval" / "samples.pt").shape == (4, 1, 28, 28)


def test_inception_from_fid_helper_gives_fid_and_says_why_there_is_no_is(trained, tmp_path):
    cfg = compose_eval(f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[fid,is]",
                       "feature_extractor=inception", "inception_weights=fid-helper", "num_samples=8",
                       "sampler=ddim", "sampling_steps=2", output_dir=tmp_path)
    values = {r["metric"]: r for r in evaluate(cfg)["results"]}
    assert values["fid"]["value"] > 0 and "inception-2015-12-05" in values["fid"]["feature_extractor"]
    assert values["is"]["value"] is None and "no logits" in values["is"]["unavailable"]


def test_ema_and_raw_weights_give_different_samples(trained, tmp_path):
    common = [f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[fid]", "feature_extractor=classifier",
              "num_samples=4", "sampler=ddim", "sampling_steps=3"]
    evaluate(compose_eval(*common, output_dir=tmp_path / "ema"))
    evaluate(compose_eval(*common, "use_ema=false", output_dir=tmp_path / "raw"))
    assert not torch.equal(torch.load(tmp_path / "ema" / "samples.pt"), torch.load(tmp_path / "raw" / "samples.pt"))


def test_one_and_two_processes_give_the_same_nll_and_images(trained, tmp_path):
    common = [f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[nll,fid]",
              "feature_extractor=classifier", "nll.num_images=5", "num_samples=7", "sampler=ddim", "sampling_steps=3",
              "trainer.accelerator=cpu"]
    one = evaluate(compose_eval(*common, "trainer.devices=1", output_dir=tmp_path / "one"))
    two = evaluate(compose_eval(*common, "trainer.devices=2", output_dir=tmp_path / "two"))
    assert two["nll"]["bpd"] == pytest.approx(one["nll"]["bpd"], abs=1e-5)
    assert np.allclose(two["nll"]["terms_bpd"], one["nll"]["terms_bpd"], atol=1e-5)
    assert torch.equal(torch.load(tmp_path / "one" / "samples.pt"), torch.load(tmp_path / "two" / "samples.pt"))


def run_evaluate(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_from_the_command_line_give_the_one_process_numbers_and_files(trained, tmp_path):
    """`python evaluate.py ... trainer.devices=2` as a user types it: the spawned processes get a config whose
    `${hydra:runtime.output_dir}` only Hydra's own process can resolve, unless it is resolved before they start."""
    common = [f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[nll,fid]",
              "feature_extractor=classifier", "nll.num_images=4", "num_samples=6", "sampler=ddim", "sampling_steps=3",
              "trainer.accelerator=cpu"]
    records = {}
    for devices in (1, 2):
        done = run_evaluate(*common, f"trainer.devices={devices}", f"hydra.run.dir={tmp_path / str(devices)}",
                            cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        records[devices] = json.loads((tmp_path / str(devices) / "metrics.json").read_text())
    one, two = records[1], records[2]
    assert two["devices"] == 2 and len(two["results"]) == len(one["results"]) == 2
    for row_one, row_two in zip(one["results"], two["results"]):
        assert row_two["metric"] == row_one["metric"] and row_two["value"] == pytest.approx(row_one["value"], abs=1e-5)
    assert np.allclose(two["nll"]["terms_bpd"], one["nll"]["terms_bpd"], atol=1e-5)
    assert (tmp_path / "2" / "samples.pt").read_bytes() == (tmp_path / "1" / "samples.pt").read_bytes()


@pytest.mark.slow
def test_bad_checkpoints_are_refused_with_one_line_and_exit_2(trained, tmp_path):
    real = open(trained["ckpt"], "rb").read()
    (tmp_path / "truncated.ckpt").write_bytes(real[: len(real) // 2])
    (tmp_path / "corrupt.ckpt").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    torch.save({"state_dict": {"layer.weight": torch.zeros(3)}}, tmp_path / "other_model.ckpt")

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"state_dict": {}, "payload": Exploit()}, tmp_path / "malicious.ckpt")
    for name, message in [("truncated", "cannot be loaded safely"), ("corrupt", "cannot be loaded safely"),
                          ("notes", "cannot be loaded safely"), ("other_model", "holds no ddpmlab config"),
                          ("malicious", "cannot be loaded safely"), ("missing", "does not exist")]:
        result = run_evaluate(f"ckpt={tmp_path / name}.ckpt", f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.startswith("error: checkpoint") and message in last, result.stderr[-800:]
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "pwned").exists()  # the pickled code never ran


def test_numbers_reach_the_wandb_summary_offline(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_eval(f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[nll_estimate]",
                       "nll_estimate.num_images=4", "nll_estimate.timesteps=2", "logger=wandb", output_dir=tmp_path)
    evaluate(cfg)
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    assert b"eval/nll_estimate (bits/dim)" in wandb_record(run, b"eval/nll_estimate (bits/dim)")


class FailOnRankOneUNet(UNet):
    """The U-Net, except that its forward raises on DDP rank 1, as a bug or a bad device would."""

    def forward(self, x, t):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise RuntimeError("injected fault on rank 1")
        return super().forward(x, t)


def test_a_rank_that_raises_ends_the_ddp_evaluation_long_before_the_collective_timeout(trained, tmp_path):
    """Bounded at a third of torch's 30-minute collective timeout, which a rank left waiting would reach, not at a
    wall-clock figure this machine's load can exceed."""
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    checkpoint["config"]["model"]["_target_"] = f"{__name__}.FailOnRankOneUNet"
    torch.save(checkpoint, tmp_path / "faulty.ckpt")
    cfg = compose_eval(f"ckpt={tmp_path / 'faulty.ckpt'}", f"data_root={trained['data']}", "metrics=[fid]",
                       "feature_extractor=classifier", "num_samples=4", "sampler=ddim", "sampling_steps=2",
                       "trainer.accelerator=cpu", "trainer.devices=2", output_dir=tmp_path / "out")
    start = time.monotonic()
    with pytest.raises(Exception, match="injected fault on rank 1"):
        evaluate(cfg)
    assert time.monotonic() - start < COLLECTIVE_TIMEOUT_S / 3


@pytest.fixture(scope="module")
def trained_edm(trained):
    """An EDM smoke checkpoint (diffusion=edm, 6 steps) on the same small data."""
    train(compose_config("experiment=smoke", "diffusion=edm", "callbacks.sample_grid.sampler=heun",
                         output_dir=trained["root"] / "edm"))
    return str(trained["root"] / "edm" / "checkpoints" / "last.ckpt")


def test_fid_against_network_calls_has_a_curve_per_sampler_and_records_the_calls(trained, tmp_path):
    common = [f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[fid]",
              "feature_extractor=classifier", "num_samples=6"]
    record = evaluate(compose_eval(*common, "sampler=[ddim,heun,edm]", "sampling_steps=[2,4]",
                                   output_dir=tmp_path / "sweep"))
    calls = {(r["sampler"], r["sampling_steps"]): r["network_calls"] for r in record["results"]}
    assert calls == {("ddim", 2): 2, ("ddim", 4): 4, ("heun", 2): 3, ("heun", 4): 7, ("edm", 2): 3, ("edm", 4): 7}
    assert (tmp_path / "sweep" / "metrics_vs_steps.png").stat().st_size > 1000
    on_disk = json.loads((tmp_path / "sweep" / "metrics.json").read_text())
    assert all("network_calls" in row for row in on_disk["results"])
    alone = evaluate(compose_eval(*common, "sampler=heun", "sampling_steps=4", output_dir=tmp_path / "one"))
    assert torch.equal(torch.load(tmp_path / "sweep" / "samples_heun_4.pt"), torch.load(tmp_path / "one" / "samples.pt"))
    assert alone["results"][0]["value"] == pytest.approx(
        next(r["value"] for r in record["results"] if (r["sampler"], r["sampling_steps"]) == ("heun", 4)))


def test_an_edm_checkpoint_gets_its_samplers_its_bound_and_the_ode_and_nothing_else(trained, trained_edm, tmp_path):
    from ddpmlab.errors import ConfigError

    common = [f"ckpt={trained_edm}", f"data_root={trained['data']}"]
    record = evaluate(compose_eval(*common, "metrics=[nll_estimate,nll_ode,fid]", "nll_estimate.num_images=4",
                                   "nll_ode.num_images=2", "nll_ode.rtol=1e-3", "nll_ode.atol=1e-3",
                                   "feature_extractor=classifier", "num_samples=4", "sampler=[heun,edm]",
                                   "sampling_steps=3", output_dir=tmp_path / "edm"))
    rows = {(r["metric"], r.get("sampler")): r for r in record["results"]}
    assert rows[("fid", "heun")]["network_calls"] == rows[("fid", "edm")]["network_calls"] == 5
    assert 0 < rows[("nll_estimate (bits/dim)", None)]["value"] < 100
    ode = record["nll_ode"]
    assert 0 < ode["bpd"] < 100 and ode["num_images"] == 2 and ode["network_calls"] >= 2 * 8
    assert (ode["sigma_min"], ode["sigma_max"], ode["prior_variance"]) == (0.002, 80.0, 6400.0)
    for overrides, message in ((["metrics=[nll]"], "metrics=\\[nll\\] is the bound over the T steps"),
                               (["metrics=[fid]", "sampler=ddim", "sampling_steps=3"],
                                "sampler=ddim is a discrete-time DDPM sampler, and this is an EDM checkpoint")):
        with pytest.raises(ConfigError, match=message):
            evaluate(compose_eval(*common, *overrides, output_dir=tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()


def test_the_ode_likelihood_sits_beside_the_bound_and_one_and_two_processes_agree(trained, tmp_path):
    """The same test images for both (nll.num_images = nll_ode.num_images: the same fixed subset); each image's
    dequantisation, probes and adaptive steps are its own, so 2 processes give the 1-process numbers."""
    common = [f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[nll,nll_ode]", "nll.num_images=3",
              "nll_ode.num_images=3", "nll_ode.rtol=1e-4", "nll_ode.atol=1e-4", "trainer.accelerator=cpu"]
    one = evaluate(compose_eval(*common, "trainer.devices=1", output_dir=tmp_path / "one"))
    two = evaluate(compose_eval(*common, "trainer.devices=2", "batch_size=2", output_dir=tmp_path / "two"))
    assert one["nll_ode"]["num_images"] == one["nll"]["num_images"] == 3
    assert one["nll_ode"]["split"] == one["nll"]["split"] == "test"
    assert two["nll_ode"]["bpd"] == pytest.approx(one["nll_ode"]["bpd"], abs=1e-3)
    assert two["nll_ode"]["stderr"] == pytest.approx(one["nll_ode"]["stderr"], abs=1e-3)
    assert abs(two["nll_ode"]["network_calls"] - one["nll_ode"]["network_calls"]) <= 12  # a rejected step at most
    on_disk = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert {"nll", "nll_ode"} <= set(on_disk) and on_disk["nll_ode"]["rtol"] == 1e-4


@pytest.mark.slow
def test_edm_settings_sweep_as_a_multirun(trained, tmp_path):
    """`python evaluate.py -m ... sampler=edm edm.S_churn=0,30`: one evaluation per value, each its own folder."""
    done = run_evaluate("-m", f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[fid]",
                        "feature_extractor=classifier", "num_samples=4", "sampler=edm", "sampling_steps=3",
                        "edm.S_churn=0,30", "edm.S_tmax=10", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = [torch.load(tmp_path / "sweep" / job / "samples.pt") for job in ("0", "1")]
    assert not torch.equal(*samples)  # churn changed the samples
    assert json.loads((tmp_path / "sweep" / "1" / "metrics.json").read_text())["results"][0]["network_calls"] == 5
