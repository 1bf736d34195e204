"""Honest names for the standard networks: a metric computed with a weight file that is not known to be the
published one is named `...-unpublished-<sha256 prefix>`, results say so once, and `validate --deep` shows each file."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from isosweep.evaluation.features import common
from isosweep.evaluation.features import resolver as bb
from isosweep.spec import DatasetSpec, EvaluationSpec

ROOT = Path(__file__).resolve().parents[1]
NOTE = "Not comparable with published FID/PPL"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_published_record_follows_torchvisions_file_naming():
    """torchvision names its file with the first 8 hex digits of the sha256; the recorded digest must agree. No
    Inception digest is recorded: no public record of it was found, and none is invented."""
    alexnet = common.PUBLISHED["alexnet"]
    assert alexnet.filename == common.ALEXNET_FILE and len(alexnet.sha256) == 64
    assert alexnet.sha256.startswith(common.ALEXNET_FILE.rsplit("-", 1)[1].split(".")[0])
    assert common.PUBLISHED["inception"].sha256 is None and common.PUBLISHED["inception"].source


def test_weight_files_are_named_by_whether_they_are_the_published_ones(standard_weights, monkeypatch):
    alexnet = common.check_weights("alexnet", standard_weights.alexnet)
    assert alexnet.sha256 == _sha256(standard_weights.alexnet) and not alexnet.published
    assert alexnet.name == f"{common.LPIPS_NAME}-{common.UNPUBLISHED}-{alexnet.sha256[:12]}"
    assert "NOT the published file" in alexnet.describe() and alexnet.sha256 in alexnet.describe()
    inception = common.check_weights("inception", standard_weights.inception)
    # no published Inception digest is on record: any Inception file, NVIDIA's included, is "unverified", never
    # "unpublished" (which says the file differs from a known digest) and never the plain name
    assert inception.name == f"{common.INCEPTION_NAME}-{common.UNVERIFIED}-{_sha256(standard_weights.inception)[:12]}"
    assert "cannot be verified" in inception.describe() and not inception.published
    assert common.unpublished_note({"fid": inception.name}) is not None

    # what each metric records, through the resolver the suite and the driver use
    ev = EvaluationSpec(backbone="standard", weights_dir=str(standard_weights.dir))
    names = bb.metric_backbone_names("standard", "shapes", ev.weights_dir)
    assert (names["fid"], names["ppl"]) == (inception.name, alexnet.name)
    nets = bb.load_feature_networks(ev, DatasetSpec(kind="shapes"), needs=("fid", "ppl"))
    assert (nets.names["fid"], nets.names["ppl"]) == (inception.name, alexnet.name)
    assert (nets.fid_features.name, nets.distance.name) == (inception.name, alexnet.name)

    # a file whose digest is the recorded one keeps today's name
    monkeypatch.setitem(common.PUBLISHED, "alexnet", dataclasses.replace(common.PUBLISHED["alexnet"], sha256=alexnet.sha256))
    monkeypatch.setitem(common.PUBLISHED, "inception", dataclasses.replace(common.PUBLISHED["inception"], sha256=inception.sha256))
    assert common.check_weights("alexnet", standard_weights.alexnet).name == common.LPIPS_NAME
    assert bb.metric_backbone_names("standard", "shapes", ev.weights_dir)["fid"] == common.INCEPTION_NAME
    assert common.check_weights("inception", standard_weights.inception).describe().endswith("the published file")


def test_a_file_is_hashed_once_per_path_size_and_mtime(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"a" * 100)
    first = common.file_sha256(path)
    assert first == hashlib.sha256(b"a" * 100).hexdigest()
    stat = path.stat()
    path.write_bytes(b"b" * 100)  # same size; the old mtime put back: the cached digest is returned, not recomputed
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert common.file_sha256(path) == first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert common.file_sha256(path) == hashlib.sha256(b"b" * 100).hexdigest()


def _outcome(tmp_path, fid_name: str, ppl_name: str):
    from isosweep.results.rows import SweepOutcome, make_row, summarize
    from isosweep.spec import load_spec

    spec = load_spec(str(ROOT / "search_spaces" / "demo.yaml"))
    metrics = {"fid": 10.0, "ppl": 100.0, "evaluated": True, "backbone_fid": fid_name, "backbone_ppl": ppl_name}
    rows = [make_row("base0001", {"baseline": True, "lambda_iso": 0.0, "p": 0.0, "iso_metric": "identity"}, metrics, "TERMINATED"),
            make_row("t0000002", {"lambda_iso": 1e-2, "p": 0.5, "iso_metric": "stereographic"}, {**metrics, "fid": 9.0}, "TERMINATED")]
    front, champion = summarize(spec, rows)
    return spec, SweepOutcome("demo-x", tmp_path, rows, front, champion)


@pytest.mark.parametrize("published", [False, True])
def test_summary_results_and_report_say_once_when_weights_are_unpublished(published, tmp_path, capsys):
    from isosweep.commands.sweep import print_summary
    from isosweep.results.report import write_report
    from isosweep.results.tables import save_tables

    ppl_name = common.LPIPS_NAME if published else f"{common.LPIPS_NAME}-{common.UNPUBLISHED}-0123456789ab"
    spec, outcome = _outcome(tmp_path, common.INCEPTION_NAME, ppl_name)
    print_summary(spec, outcome)
    out = capsys.readouterr().out
    _, md = save_tables(outcome.rows, tmp_path, spec.evaluation.bootstrap.level)
    report = (write_report(spec, outcome, tmp_path / "report") / "report.md").read_text()
    for text in (out, md.read_text(), report):
        assert text.count(NOTE) == (0 if published else 1), text
        assert published or f"ppl [{ppl_name}]" in text.split(NOTE)[1]


@pytest.mark.slow  # two CLI processes
def test_validate_deep_shows_each_networks_file_digest_and_whether_it_is_published(standard_weights, tmp_path):
    base = [sys.executable, "-m", "isosweep", "validate", str(ROOT / "search_spaces" / "demo.yaml"), "--deep",
            "--set", "evaluation.backbone=standard"]
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "ISOSWEEP_CACHE": str(tmp_path / "cache")}
    ok = subprocess.run(base + ["--set", f"evaluation.weights_dir={standard_weights.dir}"], capture_output=True, text=True,
                        timeout=300, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    lines = {line.strip().split(":")[0]: line.strip() for line in ok.stderr.split("feature networks:")[1].splitlines() if line.strip()}
    inception, alexnet = _sha256(standard_weights.inception), _sha256(standard_weights.alexnet)
    assert lines["fid"].startswith(f"fid: {common.INCEPTION_NAME}-{common.UNVERIFIED}-{inception[:12]} (clean-fid Inception-v3)")
    assert f"{standard_weights.inception} sha256 {inception}: cannot be verified" in lines["fid"]
    assert lines["ppl"].startswith(f"ppl: {common.LPIPS_NAME}-{common.UNPUBLISHED}-{alexnet[:12]} (LPIPS v0.1 AlexNet)")
    assert f"{standard_weights.alexnet} sha256 {alexnet}: NOT the published file" in lines["ppl"]
    assert lines["ls"].startswith(f"ls: {common.DOMAIN_SHAPES}") and lines["mrtl"].startswith(f"mrtl: {common.NO_BACKBONE}")

    empty = tmp_path / "empty"
    empty.mkdir()
    missing = subprocess.run(base + ["--set", f"evaluation.weights_dir={empty}"], capture_output=True, text=True,
                             timeout=300, env=env, check=False)
    assert missing.returncode == 2
    assert "field 'evaluation.backbone'" in missing.stderr and common.ALEXNET_FILE in missing.stderr and "fix" in missing.stderr
