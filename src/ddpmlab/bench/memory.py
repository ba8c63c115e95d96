"""Peak memory of one side, measured in a process that runs only that side (started by run.py).

    python -m ddpmlab.bench.memory '{"preset": ..., "side": "ddpmlab"|"diffusers", "phase": "train"|"sample", ...}'

The process imports everything both sides need, notes its memory, builds one side and runs a few training
steps or one sampler run, then prints one JSON line: the peak above the level after imports (resident set on a
CPU, torch's allocation on a GPU). Training holds the network, its gradients, Adam's state, the
EMA copy and the activations; sampling holds one network, as evaluate.py does.
"""

import argparse
import json
import sys

import torch

from ddpmlab.bench.measure import PeakMemory
from ddpmlab.bench.peer import Peer, import_diffusers
from ddpmlab.bench.run import fit, preset_config, sampler
from ddpmlab.performance import optimize_network, performance_settings
from ddpmlab.training import build, build_module, build_network


def measure(job: dict) -> int:
    args = argparse.Namespace(**{**job, "device": torch.device(job["device"])})
    cfg = preset_config(job["preset"], args)
    device = args.device
    import_diffusers()
    from diffusers.training_utils import EMAModel  # noqa: F401  (imported before measuring: both sides pay it)
    torch.nn.functional.conv2d(torch.zeros(1, 1, 4, 4, device=device), torch.zeros(1, 1, 3, 3, device=device))
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with PeakMemory(device) as memory:
        run_side(job, cfg, args, shape)
    return memory.peak_bytes


def run_side(job: dict, cfg, args: argparse.Namespace, shape: tuple[int, ...]) -> None:
    device = args.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    if job["side"] == "ddpmlab" and job["phase"] == "train":
        fit(cfg, build_module(cfg), args, steps=3)
    elif job["side"] == "ddpmlab":
        network, diffusion = build_network(cfg)
        network = optimize_network(network.to(device).eval(),  # as evaluate.py prepares it, compiled if asked
                                   *performance_settings(cfg.performance, device.type == "cuda"))
        with autocast:
            sampler(network, diffusion.to(device), shape, args)(job["sample_steps"])
    else:
        diffusion = build(cfg.diffusion)  # the diffusion alone: no ddpmlab network in the peer's measurement
        peer = Peer(cfg, diffusion, device, args.precision, training=job["phase"] == "train",
                    channels_last=job["peer_channels_last"])
        if job["phase"] == "train":
            x_0 = torch.rand(args.batch, *shape, device=device) * 2 - 1
            for _ in range(3):
                peer.train_step(x_0)
        else:
            peer.sample(args.batch, job["sample_steps"])


if __name__ == "__main__":
    print(json.dumps({"peak_bytes": measure(json.loads(sys.argv[1]))}))
