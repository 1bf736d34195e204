"""Which feature networks a run uses (`evaluation.backbone` = auto | standard | domain), and loading them.

Two families, never compared with each other (every metric records the name of the network behind it):
**standard** (`standard.py`: Inception-v3 "clean" for FID, LPIPS-AlexNet v0.1 for PPL) and **domain**
(`domain.py`: the network isosweep trains on `shapes`). LS on an image folder uses the attribute
classifier trained from `dataset.attributes` (`attributes.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from isosweep.data.attributes import AttributeFileError
from isosweep.evaluation.features.attributes import train_attribute_classifier
from isosweep.evaluation.features.common import (
    DOMAIN_SHAPES,
    INCEPTION_NAME,
    LPIPS_NAME,
    NO_BACKBONE,
    BackboneUnavailable,
    cache_dir,
    check_weights,
    private_weights_dir,
)
from isosweep.evaluation.features.domain import DomainClassifier, DomainDistance, DomainFeatures, load_shapes_net
from isosweep.evaluation.features.standard import InceptionFeatures, LpipsDistance, find_standard_weights, missing_weights_message


def resolve_backbone(eval_spec, dataset_spec) -> str:
    """The feature-network family a run uses: "standard" or "domain-shapes-v1".

    auto: standard when both weight files are present, else the domain network when the dataset is
    `shapes`, else an error naming the files. standard: an error when weights are missing. domain: only
    for `shapes`.
    """
    choice = eval_spec.backbone
    found = find_standard_weights(eval_spec.weights_dir, private_weights_dir(eval_spec))
    have_standard = all(v is not None for v in found.values())
    if choice == "standard" or (choice == "auto" and dataset_spec.kind != "shapes"):
        if not have_standard:
            raise BackboneUnavailable(missing_weights_message(eval_spec.weights_dir, found, private_weights_dir(eval_spec)))
        return "standard"
    if choice == "domain":
        if dataset_spec.kind != "shapes":
            raise BackboneUnavailable(
                f"evaluation.backbone=domain exists only for dataset.kind=shapes (got {dataset_spec.kind!r}); "
                "fix: use evaluation.backbone=standard with the Inception/AlexNet weights in evaluation.weights_dir"
            )
        return DOMAIN_SHAPES
    return "standard" if have_standard else DOMAIN_SHAPES


def metric_backbone_names(family: str, dataset_kind: str, weights_dir: str | None = None,
                          private_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """The network behind each metric, as recorded in results: {'fid', 'ppl', 'ls', 'mrtl', 'mcn', 'vor'}.

    Standard names carry `-unpublished-` or `-unverified-<sha256 prefix>` unless the weight file found (through
    `weights_dir` or the private weights folder `private_dir`) is the published one (`common.check_weights`); a file that is not found keeps the plain name (no metric uses it)."""
    if family == "standard":
        found = find_standard_weights(weights_dir, private_dir)
        names = {"fid": check_weights("inception", found["inception"]).name if found["inception"] else INCEPTION_NAME,
                 "ppl": check_weights("alexnet", found["alexnet"]).name if found["alexnet"] else LPIPS_NAME}
    elif family == DOMAIN_SHAPES:
        names = {"fid": DOMAIN_SHAPES, "ppl": DOMAIN_SHAPES}
    else:
        raise ValueError(f"unknown backbone family {family!r}")
    names["ls"] = DOMAIN_SHAPES if dataset_kind == "shapes" else "unavailable"
    names.update(mrtl=NO_BACKBONE, mcn=NO_BACKBONE, vor=NO_BACKBONE)
    return names


@dataclass
class FeatureNetworks:
    """The networks one evaluation uses, with the name recorded for each metric."""

    family: str
    names: dict[str, str] = field(default_factory=dict)
    fid_features: Callable[[torch.Tensor], torch.Tensor] | None = None
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    classifier: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


def load_feature_networks(eval_spec, dataset_spec, *, needs: tuple[str, ...] = ("fid", "ppl", "ls"),
                          device: torch.device | str = "cpu", progress: bool = False) -> FeatureNetworks:
    """Load what the metrics in `needs` use (resolving evaluation.backbone); raises BackboneUnavailable.

    LS on an image folder uses the attribute classifier trained from dataset.attributes
    (`isosweep.evaluation.features.attributes.train_attribute_classifier`, cached); its name is nets.names["ls"]. When no FID or
    PPL network is needed there, evaluation.backbone is not resolved (LS alone needs no Inception/AlexNet).
    """
    folder_ls_only = dataset_spec.kind != "shapes" and not any(m in needs for m in ("fid", "ppl"))
    family = "standard" if folder_ls_only else resolve_backbone(eval_spec, dataset_spec)
    names = metric_backbone_names(family, dataset_spec.kind, eval_spec.weights_dir, private_weights_dir(eval_spec))
    nets = FeatureNetworks(family=family, names=names)
    res = dataset_spec.resolution
    root = cache_dir(eval_spec)
    domain = None
    if family == DOMAIN_SHAPES or ("ls" in needs and dataset_spec.kind == "shapes"):
        domain = load_shapes_net(res, root, device=device, progress=progress)
    if "ls" in needs:
        if domain is not None:
            nets.classifier = DomainClassifier(domain, res)
        else:  # image folder: a classifier trained on dataset.attributes
            try:
                nets.classifier = train_attribute_classifier(dataset_spec, root, device=device, progress=progress)
            except AttributeFileError as exc:
                raise BackboneUnavailable(str(exc)) from exc
            nets.names["ls"] = nets.classifier.name
    if family == "standard":
        found = find_standard_weights(eval_spec.weights_dir, private_weights_dir(eval_spec))
        if "fid" in needs:
            nets.fid_features = InceptionFeatures(found["inception"], device)
        if "ppl" in needs:
            nets.distance = LpipsDistance(found["alexnet"], device)
    else:
        nets.fid_features = DomainFeatures(domain, res)
        nets.distance = DomainDistance(domain, res)
    return nets


def describe_backbones(eval_spec, dataset_spec, metrics: list[str]) -> list[str]:
    """One line per metric of `metrics`: the network it will use and, for a standard network, the weight file,
    its sha256 and whether it is the published file. Loads no network; raises BackboneUnavailable as a run would."""
    needs_standard = any(m in metrics for m in ("fid", "ppl"))
    family = resolve_backbone(eval_spec, dataset_spec) if needs_standard else None
    found = find_standard_weights(eval_spec.weights_dir, private_weights_dir(eval_spec)) if family == "standard" else {}
    lines = []
    for metric in metrics:
        if metric in ("fid", "ppl") and family == "standard":
            role, net = ("inception", "clean-fid Inception-v3") if metric == "fid" else ("alexnet", "LPIPS v0.1 AlexNet")
            check = check_weights(role, found[role])
            lines.append(f"{metric}: {check.name} ({net}), {check.describe()}")
        elif metric in ("fid", "ppl"):
            lines.append(f"{metric}: {DOMAIN_SHAPES} (the domain network isosweep trains on shapes; no weight file)")
        elif metric == "ls":
            lines.append(f"ls: {DOMAIN_SHAPES} (the domain network's heads)" if dataset_spec.kind == "shapes" else
                         "ls: the attribute classifier isosweep trains from dataset.attributes (attr-cnn-v1-<hash>)")
        else:
            lines.append(f"{metric}: {NO_BACKBONE} (computed in H or from the UNet; no feature network)")
    return lines
