"""Our U-Net and diffusion <-> diffusers' UNet2DModel and DDPMScheduler: configs and weight names, exactly or not at all.

What diffusers' format means was read from diffusers 0.42 (UNet2DModel, its blocks, Attention, DDPMScheduler):
a config.json lacking a field gets UNet2DModel's default for it (UNET_DEFAULTS), attention_head_dim=None means
one head per block, and the mid block's attention has a GroupNorm only when `attn_norm_num_groups` is set or the
time embedding is added (not scale-shift). Every field either maps onto an option of our U-Net or is refused in
one line naming it: a network we cannot represent exactly is never converted approximately.
A class-conditional U-Net (model.num_classes = N) is UNet2DModel's `num_class_embeds` = N + 1: diffusers adds
class_embedding(class_labels) to the time embedding after its MLP, as ours adds label_emb(y), and ours has one more
row, the last, for "no class" (classifier-free guidance). diffusers' config has no word for which row that is, so
the export says it in private fields (`_ddpmlab_num_classes`, `_ddpmlab_class_names`, which diffusers ignores);
a folder without them is imported only when told (--num-classes N: its last label is "no class").
"""

import torch

from ddpmlab.errors import ConfigError

UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,  # read only by time_embedding_type=learned, which is refused
}
# Fields whose other values build a network ours is not.
UNET_FIXED = {"center_input_sample": False, "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2D",
              "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv", "add_attention": True,
              "class_embed_type": None}
NUM_CLASSES, CLASS_NAMES = "_ddpmlab_num_classes", "_ddpmlab_class_names"  # the export's own fields
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
    "tensor_format": "pt",  # written by diffusers <= 0.2; numpy or torch arrays, nothing the math depends on
}
SCHEDULER_FIXED = {"clip_sample": True, "clip_sample_range": 1.0, "thresholding": False, "rescale_betas_zero_snr": False}
# Fields of early DDPMScheduler configs that today's diffusers drops (ConfigMixin ignores, with a warning, a key its
# __init__ lacks): each is accepted while it holds the value that changes nothing, given the other fields.
SCHEDULER_LEGACY = {
    "timestep_values": lambda c: None,  # diffusers 0.1: stored, never read
    "timesteps": lambda c: c["num_train_timesteps"],  # diffusers 0.0's name for T
    "predict_epsilon": lambda c: c["prediction_type"] == "epsilon",  # diffusers 0.5-0.8, before prediction_type
}
# the "_log" variants compute the same variances through their logarithm
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
             "fixed_large_log": "fixed_large", "learned_range": "learned_range"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers the folders we write are meant for (pyproject's bench extra)

# Weight names, module by module: (our name, diffusers' name). Attention's q, k, v are one 1x1 conv here.
RESBLOCK = (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"), ("norm2", "norm2"),
            ("conv2", "conv2"), ("skip", "conv_shortcut"))
ATTENTION = (("norm", "group_norm"), ("proj_out", "to_out.0"))
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14
# Module names: {i} a level, {j} a block in it, {u} diffusers' up-block index (the levels from the deepest).
DIFFUSERS = {"temb": ("time_embedding.linear_1", "time_embedding.linear_2"), "down": "down_blocks.{i}.resnets.{j}",
             "down_attn": "down_blocks.{i}.attentions.{j}", "downsample": "down_blocks.{i}.downsamplers.0.conv",
             "mid": ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"),
             "up": "up_blocks.{u}.resnets.{j}", "up_attn": "up_blocks.{u}.attentions.{j}",
             "upsample": "up_blocks.{u}.upsamplers.0.conv", "norm_out": "conv_norm_out", "resblock": RESBLOCK,
             "label_emb": "class_embedding",
             "attention": ATTENTION, "qkv": ("to_q", "to_k", "to_v"), "linear": True}
# The PyTorch port of the authors' TensorFlow checkpoints (pesser/pytorch_diffusion): attention by 1x1 convs.
DDPM = {"temb": ("temb.dense.0", "temb.dense.1"), "down": "down.{i}.block.{j}", "down_attn": "down.{i}.attn.{j}",
        "downsample": "down.{i}.downsample.conv", "mid": ("mid.block_1", "mid.attn_1", "mid.block_2"),
        "up": "up.{i}.block.{j}", "up_attn": "up.{i}.attn.{j}", "upsample": "up.{i}.upsample.conv",
        "norm_out": "norm_out", "resblock": (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "temb_proj"),
                                             ("norm2", "norm2"), ("conv2", "conv2"), ("skip", "nin_shortcut")),
        "attention": (("norm", "norm"), ("proj_out", "proj_out")), "qkv": ("q", "k", "v"), "linear": False}


def refuse(field: str, value, why: str) -> ConfigError:
    return ConfigError(f"{field}={value!r}: {why}; there is no approximate conversion")


def _fields(config: dict, class_name: str, defaults: dict, fixed: dict, why: str, legacy: dict | None = None) -> dict:
    """`config` with diffusers' defaults for the fields it leaves out. Another class, a field the class has not, a
    `legacy` field off its no-op value, or a value other than `fixed`'s is refused in one line naming the field."""
    if config.get("_class_name", class_name) != class_name:
        raise refuse("_class_name", config["_class_name"], f"ours is the model of diffusers' {class_name}")
    c = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, no_op in (legacy or {}).items():
        if key in c and c.pop(key) != no_op(c):
            raise refuse(key, config[key], f"today's {class_name} ignores this old field, so only {key}="
                         f"{no_op(c)!r} keeps the outputs the model was trained with")
    unknown = sorted(set(c) - set(defaults))
    if unknown:
        raise refuse(unknown[0], c[unknown[0]], f"{class_name} has no such field, so this model is another one")
    for key, value in fixed.items():
        if c[key] != value:
            raise refuse(key, c[key], f"{why} (only {key}={value!r})")
    return c


def classes_from_unet(config: dict, num_classes: int | None = None) -> int | None:
    """model.num_classes of a UNet2DModel config: None without a class embedding; N for num_class_embeds = N + 1
    whose last row is "no class", as our export says (_ddpmlab_num_classes) or `num_classes` (--num-classes) does."""
    embeds = config.get("num_class_embeds")
    said = config.get(NUM_CLASSES, num_classes)
    if embeds is None:
        if said is not None:
            raise refuse("num_class_embeds", None, f"the folder has no class embedding, so it is no model of "
                         f"{said} classes: drop --num-classes")
        return None
    if said is None:
        raise ConfigError(f"num_class_embeds={embeds}: a UNet2DModel does not say which of its labels, if any, is "
                          f"classifier-free guidance's \"no class\", and ours is the last: pass --num-classes "
                          f"{embeds - 1} if its label {embeds - 1} is \"no class\" (as ddpmlab's export writes it); "
                          "a model without one is no model of ours")
    if said != embeds - 1:
        raise refuse("num_class_embeds", embeds, f"{said} classes and \"no class\" are {said + 1} labels, not {embeds}")
    return said


def model_from_unet(config: dict, num_classes: int | None = None) -> dict:
    """Our U-Net's arguments (conf/model keys, out_channels included) from a UNet2DModel config.json; `num_classes`
    (--num-classes) for a class embedding our export did not write (classes_from_unet)."""
    c = _fields(config, "UNet2DModel", UNET_DEFAULTS, UNET_FIXED, "our U-Net has no equivalent")
    if c["act_fn"] not in ("silu", "swish"):
        raise refuse("act_fn", c["act_fn"], "our U-Net uses silu (swish)")
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        raise refuse("resnet_time_scale_shift", c["resnet_time_scale_shift"], "our U-Net has default or scale_shift")
    if c["downsample_padding"] not in (0, 1):
        raise refuse("downsample_padding", c["downsample_padding"], "our U-Net pads by 1 or TensorFlow-style (0)")
    channels, down, up = list(c["block_out_channels"]), list(c["down_block_types"]), list(c["up_block_types"])
    ch = channels[0]
    if any(b % ch for b in channels):
        raise refuse("block_out_channels", channels, f"our U-Net's widths are multiples of the first, {ch}")
    for key, types, allowed in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                                ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
        if len(types) != len(channels) or set(types) - set(allowed):
            raise refuse(key, types, f"our U-Net has {len(channels)} blocks of {' or '.join(allowed)}")
    attn_levels = [i for i, kind in enumerate(down) if kind.startswith("Attn")]
    if [i for i, kind in enumerate(reversed(up)) if kind.startswith("Attn")] != attn_levels:
        raise refuse("up_block_types", up, "our U-Net attends in the up blocks that mirror the down blocks with attention")
    size = c["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    if not isinstance(size, int):
        raise refuse("sample_size", c["sample_size"], "our U-Net needs one square image size")
    groups, shift = c["norm_num_groups"], c["resnet_time_scale_shift"]
    if groups is None:
        raise refuse("norm_num_groups", None, "our U-Net has one GroupNorm group count throughout")
    if c["attn_norm_num_groups"] not in (None, groups) or (c["attn_norm_num_groups"] is None and shift != "default"):
        raise refuse("attn_norm_num_groups", c["attn_norm_num_groups"],
                     f"our mid-block attention has a GroupNorm of norm_num_groups={groups} groups")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise refuse("time_embedding_dim", c["time_embedding_dim"], f"our time embedding has 4 x {ch} channels")
    head_dim = c["attention_head_dim"]
    attended = [channels[i] for i in attn_levels] + [channels[-1]]  # the mid block always attends
    heads = {width // head_dim if head_dim else 1 for width in attended}
    if len(heads) > 1 or (head_dim and any(width % head_dim for width in attended)):
        raise refuse("attention_head_dim", head_dim, f"our U-Net has one head count for attention widths {attended}")
    model = {"image_size": size, "in_channels": c["in_channels"], "out_channels": c["out_channels"], "ch": ch,
             "ch_mult": [b // ch for b in channels], "num_res_blocks": c["layers_per_block"],
             "attn_resolutions": [size // 2**i for i in attn_levels], "dropout": c["dropout"], "norm_groups": groups,
             "num_heads": heads.pop(), "scale_shift_norm": shift == "scale_shift", "norm_eps": c["norm_eps"],
             "downsample_padding": "same" if c["downsample_padding"] == 0 else "symmetric",
             "flip_sin_to_cos": c["flip_sin_to_cos"], "freq_shift": c["freq_shift"],
             "num_classes": classes_from_unet(config, num_classes)}
    if c["dropout"] == 0.0 and paper_dropout(model) is not None:  # diffusers' default, not the training's
        model["dropout"] = paper_dropout(model)
    return model


# Ho et al. 2020's released networks by (image size, ch, ch_mult, res blocks, attention sizes), and the dropout each
# was trained with (appendix B: 0.1 on CIFAR-10, none on the 256x256 datasets). diffusers' configs of the releases
# (google/ddpm-*) say 0.0 for all, UNet2DModel's default, and the original port's files say none.
PAPER_NETWORKS = {(32, 128, (1, 2, 2, 2), 2, (16,)): 0.1, (256, 128, (1, 1, 2, 2, 4, 4), 2, (16,)): 0.0}


def paper_dropout(model: dict) -> float | None:
    """The dropout Ho et al. trained `model` (our U-Net's arguments) with, when it is one of their networks."""
    key = (model["image_size"], model["ch"], tuple(model["ch_mult"]), model["num_res_blocks"],
           tuple(model["attn_resolutions"]))
    return PAPER_NETWORKS.get(key)


def model_from_ddpm(weights: dict, image_size: int | None) -> dict:
    """Our U-Net's arguments for weights in the DDPM port's names: widths, depth and attention levels read from the
    tensors' shapes, the rest Ho et al.'s TensorFlow network (GroupNorm of 32 groups and eps 1e-6, 'SAME' padding,
    one head, the embedding [sin, cos] with freq_shift 1). The file does not say its image size."""
    if not image_size:
        raise ConfigError("a DDPM weights file does not say its image size: pass --image-size (32 for CIFAR-10, "
                          "256 for LSUN and CelebA-HQ)")
    try:
        ch, in_channels = weights["conv_in.weight"].shape[:2]
        levels = 1 + max(int(name.split(".")[1]) for name in weights if name.startswith("down."))
        blocks = len({name.split(".")[3] for name in weights if name.startswith("down.0.block.")})
        ch_mult = [weights[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
        out_channels = weights["conv_out.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as err:
        raise ConfigError(f"the weights lack {err} of the DDPM port's network (temb.dense.0, down.0.block.0, ..., "
                          "conv_out): they are not in its names") from None
    # Ho et al. 2020, appendix B: dropout 0.1 on CIFAR-10 (swept), zero on the other (256x256) datasets
    dropout = 0.1 if image_size == 32 else 0.0
    return {"image_size": image_size, "in_channels": in_channels, "out_channels": out_channels, "ch": ch,
            "ch_mult": ch_mult, "num_res_blocks": blocks, "dropout": dropout, "norm_groups": 32, "num_heads": 1,
            "attn_resolutions": [image_size // 2**i for i in range(levels) if f"down.{i}.attn.0.q.weight" in weights],
            "scale_shift_norm": False, "norm_eps": 1e-6, "downsample_padding": "same", "flip_sin_to_cos": False,
            "freq_shift": 1}


def diffusion_from_ddpm(variance: str | None, source: str = "a DDPM weights file") -> tuple[dict, dict]:
    """Ho et al.'s schedule (linear 1e-4..0.02, T = 1000, eps prediction; DDPMScheduler's defaults too) with the
    variance their run used, which `source` (a DDPM weights file, a UNet2DModel folder without scheduler/) lacks."""
    if variance not in ("fixed_large", "fixed_small"):
        raise ConfigError(f"--variance={variance}: {source} does not say its variance; pass --variance "
                          "fixed_large (the authors' CIFAR-10 run) or fixed_small (their LSUN and CelebA-HQ runs)")
    return ({"_target_": "ddpmlab.diffusion.schedules.linear_betas", "timesteps": 1000, "beta_start": 0.0001,
             "beta_end": 0.02}, {"prediction": "eps", "variance": variance})


def unet_from_model(model: dict, out_channels: int, class_names: list[str] | None = None) -> dict:
    """A UNet2DModel config.json for our U-Net's arguments (the run's resolved `model` config); a conditional one's
    class embedding as num_class_embeds (classes and "no class"), with what diffusers cannot say in private fields."""
    ch, levels, size = model["ch"], len(model["ch_mult"]), model["image_size"]
    channels = [ch * m for m in model["ch_mult"]]
    attn_levels = [i for i in range(levels) if size // 2**i in model["attn_resolutions"]]
    attended = sorted({channels[i] for i in attn_levels} | {channels[-1]})
    heads = model.get("num_heads", 1)
    if heads > 1 and len(attended) > 1:
        raise refuse("model.num_heads", heads, f"diffusers has one head width for all attention blocks, and "
                     f"{heads} heads of widths {attended} have several")
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, **UNET_FIXED,
        "sample_size": size, "in_channels": model["in_channels"], "out_channels": out_channels,
        "time_embedding_dim": None, "act_fn": "silu",
        "freq_shift": model.get("freq_shift", 1), "flip_sin_to_cos": model.get("flip_sin_to_cos", False),
        "down_block_types": ["AttnDownBlock2D" if i in attn_levels else "DownBlock2D" for i in range(levels)],
        "up_block_types": ["AttnUpBlock2D" if i in attn_levels else "UpBlock2D" for i in reversed(range(levels))],
        "block_out_channels": channels, "layers_per_block": model["num_res_blocks"], "dropout": model["dropout"],
        "downsample_padding": 0 if model.get("downsample_padding", "symmetric") == "same" else 1,
        "attention_head_dim": attended[0] // heads if heads > 1 else None,
        "norm_num_groups": model["norm_groups"], "attn_norm_num_groups": model["norm_groups"],
        "norm_eps": model.get("norm_eps", 1e-5),
        "resnet_time_scale_shift": "scale_shift" if model.get("scale_shift_norm") else "default",
        "num_train_timesteps": None,
        **({} if model.get("num_classes") is None else {
            "num_class_embeds": model["num_classes"] + 1, NUM_CLASSES: model["num_classes"],
            **({CLASS_NAMES: list(class_names)} if class_names else {})}),
    }


def diffusion_from_scheduler(config: dict | None) -> tuple[dict, dict]:
    """(our schedule config, our diffusion's prediction/variance) from a DDPMScheduler scheduler_config.json."""
    c = _fields(config or {}, "DDPMScheduler", SCHEDULER_DEFAULTS, SCHEDULER_FIXED,
                "our samplers clip x_0 to [-1, 1] as Ho et al. do", SCHEDULER_LEGACY)
    if c["variance_type"] not in VARIANCES:
        raise refuse("variance_type", c["variance_type"], f"ours are {', '.join(VARIANCES)} (diffusers' 'learned' "
                     "reads the output as a variance, ours as a log variance)")
    if c["prediction_type"] not in PREDICTIONS:
        raise refuse("prediction_type", c["prediction_type"], f"ours are {', '.join(PREDICTIONS)}")
    steps = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        if len(c["trained_betas"]) != steps:
            raise refuse("trained_betas", f"{len(c['trained_betas'])} values", f"num_train_timesteps is {steps}")
        schedule = {"_target_": "ddpmlab.diffusion.schedules.given_betas", "timesteps": steps,
                    "betas": list(c["trained_betas"])}
    elif c["beta_schedule"] == "linear":
        schedule = {"_target_": "ddpmlab.diffusion.schedules.linear_betas", "timesteps": steps,
                    "beta_start": c["beta_start"], "beta_end": c["beta_end"]}
    elif c["beta_schedule"] == "squaredcos_cap_v2":  # Nichol & Dhariwal's eq. 17 with s = 0.008, capped at 0.999
        schedule = {"_target_": "ddpmlab.diffusion.schedules.cosine_betas", "timesteps": steps, "s": 0.008,
                    "max_beta": 0.999}
    else:
        raise refuse("beta_schedule", c["beta_schedule"], "ours are linear, squaredcos_cap_v2 or trained_betas")
    return schedule, {"prediction": PREDICTIONS[c["prediction_type"]], "variance": VARIANCES[c["variance_type"]]}


def scheduler_from_diffusion(schedule: dict, diffusion_cfg: dict, betas: torch.Tensor) -> dict:
    """A DDPMScheduler scheduler_config.json for a run's schedule and diffusion (its float64 `betas`)."""
    variance = diffusion_cfg["variance"]
    if variance not in VARIANCES.values():
        raise refuse("diffusion.variance", variance, "diffusers' DDPMScheduler reads a learned output as the "
                     "variance itself (ours: its log); use learned_range")
    if diffusion_cfg["prediction"] not in PREDICTIONS.values():
        raise refuse("diffusion.prediction", diffusion_cfg["prediction"], "diffusers' DDPMScheduler reads an output "
                     f"as one of {', '.join(PREDICTIONS)}, none of them the posterior mean")
    linear = schedule.get("_target_") == "ddpmlab.diffusion.schedules.linear_betas"
    prediction = {ours: theirs for theirs, ours in PREDICTIONS.items()}[diffusion_cfg["prediction"]]
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **SCHEDULER_FIXED,
        "num_train_timesteps": len(betas), "beta_schedule": "linear",
        "beta_start": schedule["beta_start"] if linear else 0.0001, "beta_end": schedule["beta_end"] if linear else 0.02,
        "trained_betas": None if linear else betas.tolist(),  # other schedules as their betas (float64 values)
        "variance_type": variance, "prediction_type": prediction, "timestep_spacing": "leading", "steps_offset": 0,
    }


def tensor_table(model: dict, names: dict | None = None) -> list[tuple[str, tuple[str, ...], bool]]:
    """(our tensor, the source's tensors it is made of, whether they are Linear weights of our 1x1 convs) for our
    U-Net's arguments, in diffusers' names (DIFFUSERS) or the original DDPM port's (DDPM); q, k and v are stacked
    in that order along the output channels."""
    n = names or DIFFUSERS
    levels, blocks = len(model["ch_mult"]), model["num_res_blocks"]
    attends = [model["image_size"] // 2**i in model["attn_resolutions"] for i in range(levels)]
    modules = [("temb.0", n["temb"][0], ()), ("temb.2", n["temb"][1], ()), ("conv_in", "conv_in", ())]
    k = 0
    for i in range(levels):
        for j in range(blocks):
            modules.append((f"down.{k}", n["down"].format(i=i, j=j), n["resblock"]))
            modules += [(f"down.{k}.attn", n["down_attn"].format(i=i, j=j), n["attention"])] if attends[i] else []
            k += 1
        if i != levels - 1:
            modules.append((f"down.{k}.conv", n["downsample"].format(i=i), ()))
            k += 1
    modules += [("mid.0", n["mid"][0], n["resblock"]), ("mid.0.attn", n["mid"][1], n["attention"]),
                ("mid.1", n["mid"][2], n["resblock"])]
    k = 0
    for u, i in enumerate(reversed(range(levels))):  # u: diffusers' index of the up block, i: the level
        for j in range(blocks + 1):
            modules.append((f"up.{k}", n["up"].format(u=u, i=i, j=j), n["resblock"]))
            modules += [(f"up.{k}.attn", n["up_attn"].format(u=u, i=i, j=j), n["attention"])] if attends[i] else []
            k += 1
        if i != 0:
            modules.append((f"up.{k}.conv", n["upsample"].format(u=u, i=i), ()))
            k += 1
    modules += [("norm_out", n["norm_out"], ()), ("conv_out", "conv_out", ())]
    if model.get("num_classes") is not None:  # (N + 1, 4 ch) rows, the same in both: diffusers' nn.Embedding
        modules.append(("label_emb", n["label_emb"], ()))
    table = []
    for ours, theirs, parts in modules:
        for param in ("weight", "bias"):
            table += [(f"{ours}.{a}.{param}", (f"{theirs}.{b}.{param}",), n["linear"] and a == "proj_out" and param == "weight")
                      for a, b in parts] or [(f"{ours}.{param}", (f"{theirs}.{param}",), False)]
            if parts is n["attention"]:
                table.append((f"{ours}.qkv.{param}", tuple(f"{theirs}.{x}.{param}" for x in n["qkv"]),
                              n["linear"] and param == "weight"))
    return table


def weights_to_ours(weights: dict, table, expected: dict) -> dict:
    """diffusers' state dict -> ours. `expected`: our network's state dict (names and shapes); a tensor our
    network lacks, one it has and the weights lack, or another shape is refused in one line naming it."""
    weights = {_modern_name(name): tensor for name, tensor in weights.items()}
    table = [row for row in table if row[0] in expected]  # a block whose widths do not change has no skip conv
    used = {name for _, names, _ in table for name in names}
    for name in sorted(used - weights.keys())[:1]:
        raise refuse("weights", name, "the config's network has this tensor and the weights lack it")
    for name in sorted(weights.keys() - used)[:1]:
        raise refuse("weights", name, "the weights hold a tensor the config's network has not")
    ours = {}
    for name, names, linear in table:
        tensor = torch.cat([weights[n] for n in names]) if len(names) > 1 else weights[names[0]]
        tensor = tensor[..., None, None] if linear else tensor  # a Linear's (out, in) as a 1x1 conv's (out, in, 1, 1)
        if tensor.shape != expected[name].shape:
            raise refuse("weights", names[0], f"shape {tuple(tensor.shape)} where the config's network has "
                         f"{tuple(expected[name].shape)}")
        ours[name] = tensor.to(expected[name].dtype).clone()
    return ours


def weights_to_diffusers(state: dict, table) -> dict:
    """Our U-Net's state dict -> diffusers' names and shapes (separate contiguous tensors, as safetensors wants)."""
    out = {}
    for name, names, linear in table:
        if name not in state:
            continue
        tensor = state[name].flatten(1) if linear else state[name]
        for theirs, part in zip(names, tensor.chunk(len(names))):
            out[theirs] = part.contiguous().clone()
    return out


def _modern_name(name: str) -> str:
    """query/key/value/proj_attn of diffusers' old attention blocks -> to_q/to_k/to_v/to_out.0 (diffusers does the same)."""
    head, _, last = name.rpartition(".")
    block, _, old = head.rpartition(".")
    return f"{block}.{LEGACY_ATTENTION[old]}.{last}" if ".attentions." in name and old in LEGACY_ATTENTION else name
