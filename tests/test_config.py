"""Spec validation: every kind of bad input fails early, naming the file, the field, the value and the fix."""

from pathlib import Path

import pytest
import yaml

from isosweep.cli import main
from isosweep.config import SpecError, apply_overrides, load_spec
from isosweep.sweep.resources import check_cluster_fits, max_concurrent

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "search_spaces").glob("*.yaml"))


def write(tmp_path, data, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def demo_data():
    return yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_specs_validate(path):
    spec = load_spec(path, check_paths=False)
    assert spec.name == path.stem
    # the searched space never contains the baseline: it is added as its own trial
    assert spec.search.num_trials >= 1


def test_paper_specs_use_paper_defaults():
    spec = load_spec(ROOT / "search_spaces" / "celebahq.yaml", check_paths=False)
    t = spec.train
    assert (t.learning_rate, t.global_batch_size, t.p, t.lambda_iso, t.epochs, t.ema_decay) == (1e-4, 32, 0.5, 1e-4, 10, 0.9999)
    assert spec.evaluation.fid.num_samples == 10000 and spec.evaluation.fid.ddim_steps == 20
    assert spec.evaluation.ppl.num_samples == 50000 and spec.evaluation.ppl.ddim_steps == 100


def _error(tmp_path, data, **kw) -> str:
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as exc:
        load_spec(path, **kw)
    msg = str(exc.value)
    assert str(path) in msg
    return msg


def test_unknown_key(tmp_path):
    data = demo_data()
    data["train"]["learning_rat"] = 1e-3
    msg = _error(tmp_path, data)
    assert "train.learning_rat" in msg and "spelling" in msg


def test_wrong_type(tmp_path):
    data = demo_data()
    data["train"]["global_batch_size"] = "many"
    msg = _error(tmp_path, data)
    assert "train.global_batch_size" in msg and "'many'" in msg


def test_p_out_of_range(tmp_path):
    data = demo_data()
    data["search"]["p"] = {"type": "choice", "values": [0.5, 1.5]}
    msg = _error(tmp_path, data)
    assert "search.p" in msg and "1.5" in msg and "[0, 1]" in msg
    data = demo_data()
    data["train"]["p"] = -0.1
    msg = _error(tmp_path, data)
    assert "train.p" in msg and "-0.1" in msg


def test_negative_lambda(tmp_path):
    data = demo_data()
    data["train"]["lambda_iso"] = -1.0
    msg = _error(tmp_path, data)
    assert "train.lambda_iso" in msg and "-1.0" in msg
    data = demo_data()
    data["search"]["lambda_iso"] = {"type": "uniform", "low": -1.0, "high": 1.0}
    msg = _error(tmp_path, data)
    assert "search.lambda_iso" in msg


def test_unknown_metric_name(tmp_path):
    data = demo_data()
    data["search"]["iso_metric"] = {"type": "choice", "values": ["stereographic", "riemann"]}
    msg = _error(tmp_path, data)
    assert "search.iso_metric" in msg and "riemann" in msg and "identity" in msg
    data = demo_data()
    data["train"]["iso_metric"] = "riemann"
    msg = _error(tmp_path, data)
    assert "train.iso_metric" in msg and "stereographic" in msg


def test_missing_dataset_path(tmp_path):
    data = demo_data()
    data["dataset"] = {"kind": "image_folder", "path": str(tmp_path / "nope"), "resolution": 32}
    msg = _error(tmp_path, data)
    assert "dataset.path" in msg and "nope" in msg and "fix" in msg


def test_batch_not_divisible(tmp_path):
    data = demo_data()
    data["resources"]["workers_per_trial"] = 3
    msg = _error(tmp_path, data)
    assert "global_batch_size" in msg and "3" in msg


def test_too_many_gpus_for_cluster():
    spec = load_spec(ROOT / "search_spaces" / "celebahq.yaml", check_paths=False)
    with pytest.raises(SpecError) as exc:
        check_cluster_fits(spec, {"CPU": 2.0}, "celebahq.yaml")
    msg = str(exc.value)
    assert "celebahq.yaml" in msg and "resources" in msg and "4 GPUs" in msg and "fix" in msg
    check_cluster_fits(spec, {"CPU": 64.0, "GPU": 8.0})
    assert max_concurrent(spec, {"CPU": 64.0, "GPU": 8.0}) == 2


def test_overrides(tmp_path):
    path = write(tmp_path, demo_data())
    spec = load_spec(path, ["search.num_trials=2", "train.lambda_iso=0.5", "search.iso_metric.values=[identity]"])
    assert spec.search.num_trials == 2 and spec.train.lambda_iso == 0.5 and spec.search.iso_metric.values == ["identity"]
    with pytest.raises(SpecError, match="key.path=value"):
        apply_overrides({}, ["search.num_trials"])
    with pytest.raises(SpecError, match="search.num_trial"):
        load_spec(path, ["search.num_trial=2"])


def test_validate_command(tmp_path, capsys):
    assert main(["validate", str(ROOT / "search_spaces" / "demo.yaml")]) == 0
    assert "name: demo" in capsys.readouterr().out
    data = demo_data()
    data["train"]["iso_metric"] = "riemann"
    assert main(["validate", str(write(tmp_path, data))]) == 2
    assert "train.iso_metric" in capsys.readouterr().err


@pytest.mark.parametrize("section", ["train", "search"])
def test_old_metric_key_names_its_new_name(tmp_path, section, capsys):
    """`metric:` was renamed `iso_metric:` (the metric G, not an evaluation metric): the error says so."""
    data = demo_data()
    data[section]["metric"] = data[section].pop("iso_metric")
    path = write(tmp_path, data)
    msg = _error(tmp_path, data)
    assert f"{section}.metric' was renamed to '{section}.iso_metric'" in msg and str(path) in msg
    assert main(["validate", str(path)]) == 2
    assert "rename the key to 'iso_metric'" in capsys.readouterr().err
    with pytest.raises(SpecError, match="renamed"):
        load_spec(ROOT / "search_spaces" / "demo.yaml", [f"{section}.metric=identity" if section == "train" else "search.metric.type=choice"])
