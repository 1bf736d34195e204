"""A metric added as one file of evaluation/suite_metrics: found, computed by evaluate_model, recorded, and carried
by a results row; an unknown name is refused naming the field and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from isosweep.evaluation import suite_metrics
from isosweep.evaluation.record import read_record
from isosweep.evaluation.suite import evaluate_model
from isosweep.results.rows import make_row
from isosweep.spec import DatasetSpec, EvaluationSpec, SpecError
from isosweep.spec import evaluation as spec_evaluation

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

# The whole of an added metric, as docs/metrics.md ("Adding a metric") shows it.
TOY = '''
"""Toy: the mean absolute pixel value of a few generated samples, with a bootstrap interval."""

import numpy as np

from isosweep.core.sampling import initial_noise
from isosweep.evaluation.metrics.confidence import mean_interval
from isosweep.evaluation.suite_metrics.base import Metric, register


@register
class Toy(Metric):
    names = ("toy",)
    num_samples, ddim_steps = 5, 2

    def share(self, shard, nets):
        lo, hi = shard.range(self.num_samples)  # this rank's samples
        x = initial_noise(hi - lo, shard.shape, shard.eval_spec.seed, start=lo)
        return shard.sampler(x, self.ddim_steps).images.abs().flatten(1).mean(1).double().numpy()

    def combine(self, result, shares, shard, nets):
        result.values["toy_samples"] = values = np.concatenate(shares)  # rank order: sample order
        result.metrics["toy"] = float(values.mean())
        result.metrics.update(mean_interval("toy", values, **shard.boot))

    def settings(self, eval_spec):
        return {"toy": {"num_samples": self.num_samples, "ddim_steps": self.ddim_steps}}
'''


@pytest.fixture
def toy_file(tmp_path, monkeypatch):
    """toy.py dropped beside the built-in metric modules (a second folder of the package), then found the way they are."""
    folder = tmp_path / "added"
    folder.mkdir()
    (folder / "toy.py").write_text(TOY)
    registry = dict(suite_metrics.REGISTRY)
    monkeypatch.setattr(suite_metrics, "__path__", [*suite_metrics.__path__, str(folder)])
    monkeypatch.setattr(spec_evaluation, "_ADDED_RESULTS", set())
    suite_metrics.import_metric_modules()
    yield
    suite_metrics.REGISTRY.clear()
    suite_metrics.REGISTRY.update(registry)
    sys.modules.pop(f"{suite_metrics.__name__}.toy", None)


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8).eval()


def test_an_added_metric_lands_in_the_record_and_the_row(toy_file, tmp_path):
    from diffusers import DDIMScheduler

    ev = EvaluationSpec(metrics=["toy", "mrtl"], cache_dir=str(tmp_path), batch_size=8, seed=3,
                        mrtl={"num_pairs": 2, "num_points": 3, "ddim_steps": 2}, bootstrap={"resamples": 50})
    result = evaluate_model(tiny_unet(), DDIMScheduler(num_train_timesteps=1000), ev, DatasetSpec(kind="shapes", resolution=16),
                            device="cpu", progress=False, images=False)
    toy = result.values["toy_samples"]
    assert toy.shape == (5,) and result.metrics["toy"] == pytest.approx(float(toy.mean()))
    assert result.metrics["toy_lo"] <= result.metrics["toy"] <= result.metrics["toy_hi"]
    assert "mrtl" in result.metrics  # a built-in beside it is unchanged in kind
    assert result.settings["toy"] == {"num_samples": 5, "ddim_steps": 2} and result.backbones["toy"] == "none"

    result.write(tmp_path / "ckpt")
    assert read_record(tmp_path / "ckpt").metrics["toy"] == result.metrics["toy"]  # records keep a registered name
    row = make_row("t0", {"lambda_iso": 0.1}, {**result.metrics, "evaluated": True}, "TERMINATED")
    assert row["toy"] == result.metrics["toy"] and row["toy_hi"] == result.metrics["toy_hi"]


def test_unknown_metric_names_are_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(spec_evaluation, "_ADDED_RESULTS", set())
    with pytest.raises(ValueError, match="not metric names"):
        EvaluationSpec(metrics=["fid", "Toy Metric"])
    ev = EvaluationSpec(metrics=["fid", "nope"])  # a name an added module could have: the evaluation layer decides
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['nope'\].*suite_metrics/<name>\.py"):
        evaluate_model(tiny_unet(), None, ev, DatasetSpec(kind="shapes", resolution=16), device="cpu", progress=False)

    from isosweep.commands.validate import check_metric_names

    with pytest.raises(SpecError, match=r"spec.yaml: field 'evaluation.metrics': unknown metric\(s\) \['nope'\]"):
        check_metric_names(SimpleNamespace(evaluation=ev), "spec.yaml")  # `isosweep validate` and `run` say the same
    check_metric_names(SimpleNamespace(evaluation=EvaluationSpec()), "spec.yaml")


@pytest.mark.parametrize("name", ["fid", "ls_x", "ppl_y"])
def test_an_added_metric_cannot_take_a_built_in_name(name):
    """A taken name, or one that reads as a built-in's value (`ls_x` is LS's), is refused when the class registers."""
    from isosweep.evaluation.suite_metrics import Metric, register

    with pytest.raises(ValueError, match="must be non-empty and new"):
        register(type("Clash", (Metric,), {"names": (name,)}))
    assert type(suite_metrics.REGISTRY["fid"]).__name__ == "Fid"
    assert "ls_x" not in suite_metrics.REGISTRY and "ppl_y" not in suite_metrics.REGISTRY


def test_a_sweep_read_back_keeps_an_added_metrics_values_without_importing_the_suite():
    """`isosweep results`, `status` and `sync` load the sweep's spec but not the evaluation suite: the spec's metric
    names are enough for rows and records to keep an added metric's values."""
    code = """
import sys
from isosweep.spec import EvaluationSpec
from isosweep.results.rows import make_row
EvaluationSpec(metrics=["fid", "toy"])
row = make_row("t0", {"lambda_iso": 0.1}, {"toy": 0.5, "toy_hi": 0.7, "junk": 1.0, "evaluated": True}, "TERMINATED")
assert "isosweep.evaluation.suite_metrics" not in sys.modules, "the suite was imported"
assert row["toy"] == 0.5 and row["toy_hi"] == 0.7 and "junk" not in row, row
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
