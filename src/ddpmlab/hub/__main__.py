"""python -m ddpmlab.hub import SRC --out OUT.ckpt | export CKPT --out DIR [--push-to-hub owner/name]

Bad input (a folder that is no diffusers folder, a network ours cannot represent exactly, no network for hf://)
is one line on stderr and exit 2, with nothing written.
"""

import json
import sys
from pathlib import Path

from ddpmlab.errors import ConfigError, OneLineParser
from ddpmlab.hub import export_pipeline, import_checkpoint
from ddpmlab.hub.convert import NUM_CLASSES, paper_dropout


def same_network(config: dict) -> list[str]:
    """train.py overrides that build the stored config's data shape, network and diffusion (init_from checks only
    the weights' shapes, and norm_eps or the padding change outputs, not shapes)."""
    model = {k: v for k, v in config["model"].items() if k not in ("_target_", "image_size", "in_channels", "out_channels")}
    schedule = config["schedule"]["_target_"].rsplit(".", 1)[1].removesuffix("_betas")  # given_betas -> given.yaml
    values = {"data": config["data"]["dataset"], "data.image_size": config["data"]["image_size"],
              "data.channels": config["data"]["channels"], **{f"model.{k}": v for k, v in model.items()},
              **{f"diffusion.{k}": config["diffusion"][k] for k in ("prediction", "variance", "loss")},
              # given: the betas themselves, printed as Python's shortest repr, which Hydra reads back to the same float
              "schedule": schedule, **{f"schedule.{k}": v for k, v in config["schedule"].items() if k != "_target_"}}
    return [f"{key}={_override(value)}" for key, value in values.items()]


def _override(value) -> str:
    """A value as Hydra's override grammar reads it: true, false, null, and lists without spaces."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value).replace(" ", "")


def main(argv=None) -> None:
    parser = OneLineParser(prog="python -m ddpmlab.hub", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("import", help="a diffusers DDPMPipeline or UNet2DModel folder -> a ddpmlab checkpoint")
    load.add_argument("src", help="a local folder, hf://owner/name (e.g. hf://google/ddpm-cifar10-32), or a "
                                  "weights file in the original DDPM port's names")
    load.add_argument("--out", required=True, help="the checkpoint to write (a new file)")
    load.add_argument("--data", help="the conf/data option its images are (default: cifar10 for 3x32x32, "
                                     "fashion_mnist for 1x28x28, else image_folder)")
    load.add_argument("--data-root", help="data.root of the stored config (default: the data option's)")
    load.add_argument("--image-size", type=int, help="a DDPM weights file only: its image size")
    load.add_argument("--variance", help="a DDPM weights file or a UNet2DModel folder without scheduler/ only: "
                                         "fixed_large (CIFAR-10) or fixed_small (LSUN, CelebA-HQ)")
    load.add_argument("--num-classes", type=int, help="a class-conditional UNet2DModel that ddpmlab did not export: N "
                                                      "when its num_class_embeds is N + 1 and label N is \"no class\"")
    save = commands.add_parser("export", help="a ddpmlab checkpoint -> a DDPMPipeline folder")
    save.add_argument("ckpt", help="a checkpoint written by train.py or by import")
    save.add_argument("--out", required=True, help="the folder to write (new or empty)")
    save.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA ones")
    save.add_argument("--push-to-hub", metavar="OWNER/NAME", help="also upload the folder to the Hub")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            config = import_checkpoint(args.src, args.out, args.data, args.data_root, args.image_size, args.variance,
                                       args.num_classes)
            data, diffusion = config["data"], config["diffusion"]
            dropout = paper_dropout(config["model"])
            print(f"wrote {args.out}: {data['channels']}x{data['image_size']}x{data['image_size']} "
                  f"{data['dataset']}, {diffusion['prediction']} prediction, {diffusion['variance']} variance; "
                  f"evaluate: python evaluate.py ckpt={args.out}; fine-tune: python train.py ckpt_path={args.out} "
                  + " ".join(same_network(config))
                  + (f" (model.dropout={dropout}: what Ho et al. trained this network with, appendix B, whatever the "
                     "source's config says)" if dropout is not None and config["model"]["dropout"] == dropout else ""))
        else:
            T = export_pipeline(args.ckpt, args.out, use_ema=not args.raw, push_to=args.push_to_hub)
            num_classes = json.loads((Path(args.out) / "unet" / "config.json").read_text()).get(NUM_CLASSES)
            uploaded = f"; uploaded to hf://{args.push_to_hub}" if args.push_to_hub else ""
            if num_classes is None:
                print(f"wrote {args.out}: DDPMPipeline.from_pretrained({args.out!r})(batch_size=16, "
                      f"num_inference_steps={T}) samples as our ancestral sampler (all T={T} steps){uploaded}")
            else:  # DDPMPipeline calls its UNet without class_labels, which a class embedding needs
                print(f"wrote {args.out}: a class-conditional UNet2DModel ({num_classes} classes, label {num_classes} "
                      f"= \"no class\") and its DDPMScheduler; DDPMPipeline passes no class labels, so call the UNet "
                      f"as unet(x_t, t, class_labels=y).sample in your own loop over scheduler.step, with guidance "
                      f"uncond + s * (cond - uncond) at s = 1 + w (ddpmlab's w){uploaded}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
