"""Spec validation: every kind of bad input fails early, naming the file, the field, the value and the fix."""

from pathlib import Path

import pytest
import yaml

from isosweep.cli import main
from isosweep.spec import SpecError, apply_overrides, load_spec
from isosweep.sweep.resources import check_cluster_fits, max_concurrent
from isosweep.sweep.search import planned_trials

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "search_spaces").glob("*.yaml"))
PAPER_SPECS = ("celebahq", "cifar10", "lsun_bedroom", "lsun_church")  # the paper's Table 1 datasets
# The paper's configurations, one spec per dataset (`<dataset>_paper.yaml`): (lambda_iso, p, G) of each table row it runs.
TABLE1_POINT = (1e-4, 0.5, "stereographic")
PAPER_POINTS = {"celebahq": [(1e-4, 0.0, "identity"), (1e-3, 0.5, "identity"), (1e-4, 0.5, "identity"), TABLE1_POINT],  # Table 3
                "cifar10": [TABLE1_POINT], "lsun_bedroom": [TABLE1_POINT], "lsun_church": [TABLE1_POINT]}


def write(tmp_path, data, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def demo_data():
    return yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())


def test_every_documented_spec_is_shipped():
    """The README and docs name these specs; a missing one would also silently empty the parametrised tests below."""
    assert {p.stem for p in SPECS} == {"demo", "shapes_study", "shapes_study_ablations", "shapes_study_lazy", *PAPER_SPECS,
                                       *(f"{name}_paper" for name in PAPER_SPECS)}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_specs_validate(path):
    """Every spec loads, always offers the paper's metric G, and never searches the baseline (its own trial)."""
    spec = load_spec(path, check_paths=False)
    assert spec.name == path.stem
    s = spec.search
    assert "stereographic" in s.iso_metric.values
    # the searched space never contains the baseline (lambda_iso = 0 or p = 1): it is added as its own trial
    assert min(s.lambda_iso.bounds()) > 0 and max(s.p.bounds()) < 1
    assert all(q.lambda_iso > 0 and q.p < 1 for q in s.points)  # search.points (the study's stage 2) likewise


def test_shipped_specs_resolve_to_their_pinned_settings():
    """tests/data/shipped_specs_resolved.json pins every shipped spec's resolved settings (its validated dump, after
    `extends` is merged in): rewriting a spec, moving keys into a parent or changing a parent must not change what any
    spec runs. A resume compares every field of the saved spec, so a change would also refuse to resume the sweeps
    that ran with the old settings. A change is deliberate: regenerate the fixture (`json.dumps` of
    {file name: load_spec(path, check_paths=False).to_dict()}, indent=1, sort_keys=True) and say why in the commit."""
    import json

    pinned = json.loads((ROOT / "tests" / "data" / "shipped_specs_resolved.json").read_text())
    assert sorted(pinned) == [p.name for p in SPECS]
    for path in SPECS:
        assert load_spec(path, check_paths=False).to_dict() == pinned[path.name], path.name


def test_shipped_specs_register_under_their_own_names():
    """Two specs sharing a registered model name would overwrite each other's @champion alias."""
    names = [load_spec(p, check_paths=False).registry_name for p in SPECS]
    assert len(set(names)) == len(names), names


def test_demo_spec_is_the_readme_demo():
    """README 'What the demo does': an Optuna sweep over lambda_iso, p and G on the built-in shapes model,
    all six metrics, the edit and inversion ones on the offline domain backbone, the champion from (FID, PPL), on a 2-core CPU."""
    spec = load_spec(ROOT / "search_spaces" / "demo.yaml")  # paths checked: nothing to mount or download
    assert spec.base_model.source == "builtin:shapes" and spec.dataset.kind == "shapes"
    assert spec.search.algorithm == "optuna" and spec.search.num_trials == 3
    assert planned_trials(spec) == 4  # the README's "(2/4 done; ...)": three searched trials plus the baseline
    assert sorted(spec.evaluation.metrics) == sorted(["fid", "ppl", "mrtl", "mcn", "vor", "ls", "edit_linearity",
                                                      "edit_straightness", "edit_consistency", "inversion_mse",
                                                      "inversion_perceptual"])
    assert spec.evaluation.backbone == "domain"  # no Inception/AlexNet download
    assert spec.selection.objectives == ["fid", "ppl"]
    assert spec.registry_name == "isodiff-demo"  # models:/isodiff-demo@champion in the README
    assert not spec.resources.use_gpu
    check_cluster_fits(spec, {"CPU": 2.0})
    assert max_concurrent(spec, {"CPU": 2.0}) == 2


def test_shapes_study_stage_one_is_the_lambda_grid():
    """docs/results.md: stage 1 of the study is the paper's setting (stereographic, p = 0.5) at lambda_iso in
    {1e-4, 1e-3, 1e-2} plus the baseline, 240 steps each, best-FID checkpoints and LS."""
    spec = load_spec(ROOT / "search_spaces" / "shapes_study.yaml")
    s = spec.search
    assert s.algorithm == "grid" and planned_trials(spec) == 4
    assert sorted(s.lambda_iso.values) == [1e-4, 1e-3, 1e-2] and s.p.values == [0.5] and s.iso_metric.values == ["stereographic"]
    assert spec.train.max_steps == 240 and s.max_concurrent_trials == 2 and spec.train.iso_timesteps == "per_timestep"
    assert spec.evaluation.checkpoint_fid.every > 0 and "ls" in spec.evaluation.metrics
    assert spec.evaluation.backbone == "domain" and spec.base_model.source == "builtin:shapes"


def test_shapes_study_stage_two_is_the_ablations_at_one_lambda_over_three_seeds():
    """docs/results.md: stage 2 runs, at stage 1's best lambda_iso and with stage 1's training and evaluation, G in
    {identity, ambient}, the pooled loss and p = 0, and the lambda_iso = 1e-8 control, each at seeds 0, 1, 2."""
    one = load_spec(ROOT / "search_spaces" / "shapes_study.yaml").to_dict()
    spec = load_spec(ROOT / "search_spaces" / "shapes_study_ablations.yaml")
    two = spec.to_dict()
    for section in ("base_model", "dataset", "train", "evaluation", "selection", "resources"):
        assert two[section] == one[section], section
    points = [(q.lambda_iso, q.p, q.iso_metric, q.iso_timesteps or spec.train.iso_timesteps) for q in spec.search.points]
    best = 1e-2
    rows = {(best, 0.5, "identity", "per_timestep"), (best, 0.5, "ambient", "per_timestep"),
            (best, 0.5, "stereographic", "pooled"), (best, 0.0, "stereographic", "per_timestep"),
            (1e-8, 0.5, "stereographic", "per_timestep")}
    assert set(points) == rows and all(points.count(r) == 3 for r in rows)
    assert sorted({q.seed for q in spec.search.points}) == [0, 1, 2] and planned_trials(spec) == 16


def test_ls_where_attribute_labels_exist():
    """LS, scored on held-out samples, in every spec whose data have attribute labels (shapes: the domain
    network's five factors; CelebA-HQ: its 40 attributes), in x_T and h; CIFAR-10 and LSUN have none. The demo's
    LS stays a small smoke test (x_T only, 128 samples)."""
    specs = {p.stem: load_spec(p, check_paths=False) for p in SPECS}
    for name in ("demo", "shapes_study", "celebahq"):
        ls = specs[name].evaluation.ls
        assert "ls" in specs[name].evaluation.metrics and 0 < ls.heldout < 1 and ls.keep <= ls.num_samples, name
    celeba = specs["celebahq"]
    assert celeba.dataset.attributes and (celeba.evaluation.ls.num_samples, celeba.evaluation.ls.keep) == (2000, 1000)
    assert celeba.evaluation.ls.spaces == specs["shapes_study"].evaluation.ls.spaces == ["x_T", "h"]
    assert specs["demo"].evaluation.ls.spaces == ["x_T"] and specs["demo"].evaluation.ls.num_samples <= 128
    for name in ("cifar10", "lsun_bedroom", "lsun_church"):
        assert "ls" not in specs[name].evaluation.metrics and specs[name].dataset.attributes is None, name


@pytest.mark.parametrize("name", PAPER_SPECS)
def test_paper_specs_search_around_the_paper_setting(name):
    """Each Table 1 dataset: the paper's recipe (lr 1e-4, lambda_iso 1e-4, p 0.5, stereographic G) as the fixed
    train values, a log-uniform lambda_iso search around it, Table 3's p and G rows, and the matching hub model."""
    spec = load_spec(ROOT / "search_spaces" / f"{name}.yaml", check_paths=False)
    t, s = spec.train, spec.search
    assert (t.learning_rate, t.lambda_iso, t.p, t.iso_metric) == (1e-4, 1e-4, 0.5, "stereographic")
    assert (s.lambda_iso.type, s.lambda_iso.low, s.lambda_iso.high) == ("loguniform", 1e-5, 1e-3)
    assert s.lambda_iso.low < t.lambda_iso < s.lambda_iso.high
    assert sorted(s.p.values) == [0.0, 0.5] and sorted(s.iso_metric.values) == ["ambient", "identity", "stereographic"]
    assert spec.evaluation.fid.num_samples == 10000 and spec.evaluation.ppl.num_samples == 50000
    # MCN/VoR at several t, at least one below the regularised range t >= pT, over more samples than before (32)
    jac = spec.evaluation.jacobian
    assert jac.timesteps[0] == 999 and min(jac.timesteps) < t.p * 1000 and jac.num_samples >= 64
    assert spec.evaluation.backbone == "standard" and spec.resources.use_gpu
    # the base model is the google/ddpm-* checkpoint trained at the spec's resolution (its id ends in it)
    assert spec.base_model.source.startswith("google/ddpm-")
    assert spec.base_model.source.endswith(f"-{spec.dataset.resolution}") and spec.dataset.kind == "image_folder"


@pytest.mark.parametrize("name", [*PAPER_SPECS, *(f"{n}_paper" for n in PAPER_SPECS)])
def test_paper_specs_use_paper_defaults(name):
    """Sec. 4.1 on every dataset: Adam lr 1e-4, global batch 32, p 0.5, lambda_iso 1e-4, 10 epochs, EMA 0.9999, FID-10k at 20
    DDIM steps, PPL-50k at 100 steps with eps 1e-4."""
    spec = load_spec(ROOT / "search_spaces" / f"{name}.yaml", check_paths=False)
    t = spec.train
    assert (t.learning_rate, t.global_batch_size, t.p, t.lambda_iso, t.epochs, t.ema_decay) == (1e-4, 32, 0.5, 1e-4, 10, 0.9999)
    assert spec.evaluation.fid.num_samples == 10000 and spec.evaluation.fid.ddim_steps == 20
    assert spec.evaluation.ppl.num_samples == 50000 and spec.evaluation.ppl.ddim_steps == 100 and spec.evaluation.ppl.eps == 1e-4


@pytest.mark.parametrize("name", PAPER_SPECS)
def test_paper_configuration_specs_are_the_tables_rows(name):
    """`<dataset>_paper.yaml` runs exactly the paper's rows for its dataset (Table 1's point; on CelebA-HQ Table 3's four
    rows, which include it) after the baseline, trained and evaluated as `<dataset>.yaml` trains and evaluates except that
    every row gets the full protocol the paper reports (no screening, PPL over all its pairs), under its own registry name."""
    search = load_spec(ROOT / "search_spaces" / f"{name}.yaml", check_paths=False)
    spec = load_spec(ROOT / "search_spaces" / f"{name}_paper.yaml", check_paths=False)
    s = spec.search
    assert s.algorithm == "points" and planned_trials(spec) == 1 + len(PAPER_POINTS[name])
    assert [(q.lambda_iso, q.p, q.iso_metric) for q in s.points] == PAPER_POINTS[name]
    assert all(q.seed is None and q.iso_timesteps is None for q in s.points)  # train's seed and per-timestep loss
    a, b = spec.to_dict(), search.to_dict()
    for section in ("base_model", "dataset", "train", "selection", "resources"):
        assert a[section] == b[section], section
    ppl = ("num_samples", "ddim_steps", "eps")  # round_pairs matters only with stop_width
    assert {k: a["evaluation"]["ppl"][k] for k in ppl} == {k: b["evaluation"]["ppl"][k] for k in ppl}
    assert a["evaluation"]["ppl"]["stop_width"] is None and a["evaluation"]["screening"] is None
    assert {**a["evaluation"], "ppl": None, "screening": None} == {**b["evaluation"], "ppl": None, "screening": None}
    assert spec.registry_name == f"{search.registry_name}-paper"


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


@pytest.mark.parametrize("field", ["train.seed", "search.points.0.seed", "search.seed", "dataset.seed", "evaluation.seed"])
def test_negative_seeds_are_refused(tmp_path, field):
    """torch and numpy generators refuse a negative seed: the spec does, before a trial starts and crashes."""
    data = demo_data()
    data["search"].update(algorithm="points", points=[{"lambda_iso": 1e-4, "p": 0.5, "iso_metric": "identity", "seed": 1}])
    load_spec(write(tmp_path, data))  # the point's own seed is fine
    if field.startswith("search.points"):
        data["search"]["points"][0]["seed"] = -1
    else:
        section, key = field.split(".")
        data[section][key] = -1
    msg = _error(tmp_path, data)
    assert f"field '{field}'" in msg and "greater than or equal to 0" in msg and "(got -1)" in msg


def test_unknown_metric_name(tmp_path):
    data = demo_data()
    data["search"]["iso_metric"] = {"type": "choice", "values": ["stereographic", "riemann"]}
    msg = _error(tmp_path, data)
    assert "search.iso_metric" in msg and "riemann" in msg and "identity" in msg
    data = demo_data()
    data["train"]["iso_metric"] = "riemann"
    msg = _error(tmp_path, data)
    assert "train.iso_metric" in msg and "stereographic" in msg


def test_iso_timesteps_defaults_to_the_paper_and_names_the_field(tmp_path):
    """train.iso_timesteps: per_timestep (Eq. 6 at one t) unless a spec says pooled; a bad value names the field and the choices."""
    for path in SPECS:
        assert load_spec(path, check_paths=False).train.iso_timesteps == "per_timestep", path.name
    assert load_spec(write(tmp_path, demo_data()), ["train.iso_timesteps=pooled"]).train.iso_timesteps == "pooled"
    data = demo_data()
    data["train"]["iso_timesteps"] = "mixed"
    msg = _error(tmp_path, data)
    assert "train.iso_timesteps" in msg and "mixed" in msg and "per_timestep" in msg and "pooled" in msg


def test_a_sweep_saved_before_iso_timesteps_resumes_pooled():
    """A spec saved before train.iso_timesteps existed ran pooled: resuming it keeps pooled, and a given spec
    that now defaults to per_timestep is a result-changing difference, refused with both values."""
    from isosweep.spec.changes import spec_for_resume

    saved = load_spec(ROOT / "search_spaces" / "demo.yaml", check_paths=False).to_dict()
    del saved["train"]["iso_timesteps"]
    assert spec_for_resume(saved, None, allow_changes=False, source="x").train.iso_timesteps == "pooled"
    given = load_spec(ROOT / "search_spaces" / "demo.yaml", check_paths=False)
    with pytest.raises(SpecError, match="train.iso_timesteps: 'pooled' -> 'per_timestep'"):
        spec_for_resume(saved, given, allow_changes=True, source="demo.yaml")
    assert "iso_timesteps" not in saved["train"]  # the caller's dict is left alone


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


def test_trials_of_a_sweep_started_before_the_rename_keep_their_metric():
    """A stored Tune config or results row still saying `metric` is read as `iso_metric`, never the default."""
    from isosweep.results.rows import make_row
    from isosweep.spec import resolve_trial_spec, trial_params_of

    old = {"lambda_iso": 1e-3, "p": 0.5, "metric": "identity", "baseline": False}
    params = trial_params_of(old)
    assert params == {"lambda_iso": 1e-3, "p": 0.5, "iso_metric": "identity", "baseline": False}
    spec = load_spec(ROOT / "search_spaces" / "demo.yaml", check_paths=False)
    assert resolve_trial_spec(spec, params).train.iso_metric == "identity"
    assert make_row("t", old, {}, "TERMINATED")["iso_metric"] == "identity"


# --- validation holes closed before any trial starts ---

def _set(data, dotted, value):
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), "inf"], ids=["inf", "-inf", "nan", "text-inf"])
@pytest.mark.parametrize("field", ["train.learning_rate", "train.lambda_iso", "train.epochs", "train.adam_eps",
                                   "search.lambda_iso.high", "selection.fid_tolerance", "selection.weights.fid"])
def test_every_float_is_finite(tmp_path, field, bad):
    """inf and nan (YAML .inf / .nan) are refused in every float field, search bounds included."""
    data = demo_data()
    if field.startswith("search.lambda_iso"):
        data["search"]["lambda_iso"] = {"type": "uniform", "low": 1e-5, "high": 1e-3}
    msg = _error(tmp_path, _set(data, field, bad))
    assert f"'{field}'" in msg and "finite" in msg and "fix" in msg


@pytest.mark.parametrize("value", ["abc", None, "1.5", True, float("nan")], ids=["abc", "null", "quoted-1.5", "bool", "nan"])
@pytest.mark.parametrize("dim", ["lambda_iso", "p"])
def test_choice_values_must_be_numbers(tmp_path, dim, value):
    data = demo_data()
    data["search"][dim] = {"type": "choice", "values": [0.5, value]}
    msg = _error(tmp_path, data)
    assert f"search.{dim}" in msg and repr(value) in msg and "not a finite number" in msg and "fix" in msg


@pytest.mark.parametrize("value", [None, 1.5, "Stereographic"])
def test_iso_metric_choice_needs_known_names(tmp_path, value):
    data = demo_data()
    data["search"]["iso_metric"] = {"type": "choice", "values": ["identity", value]}
    msg = _error(tmp_path, data)
    assert "search.iso_metric" in msg and repr(value) in msg and "stereographic" in msg


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "-x", "a b", "x" * 101])
def test_name_is_a_safe_folder_name(tmp_path, name):
    data = demo_data()
    data["name"] = name
    msg = _error(tmp_path, data)
    assert "'name'" in msg and "fix" in msg
    assert load_spec(write(tmp_path, {**demo_data(), "name": "demo-2.v1_x"})).name == "demo-2.v1_x"


def test_empty_image_folder_is_found_with_path_checks(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "notes.txt").write_text("no images here")
    data = demo_data()
    data["dataset"] = {"kind": "image_folder", "path": str(folder), "resolution": 32}
    msg = _error(tmp_path, data)
    assert "dataset.path" in msg and "no images" in msg and "fix" in msg
    load_spec(write(tmp_path, data), check_paths=False)  # the cluster's paths: not checked
    (folder / "sub" / "x.PNG").write_bytes(b"")  # found at any depth, any case (decoding is --deep's job)
    load_spec(write(tmp_path, data))


def test_string_choices_read_yaml_boolean_words_back(tmp_path):
    """`mixed_precision: no` is YAML 1.1's False: read back as "no"; in --set, text fields keep the text as typed."""
    path = tmp_path / "spec.yaml"
    path.write_text((ROOT / "search_spaces" / "demo.yaml").read_text() + "\n")
    data = demo_data()
    data["train"]["mixed_precision"] = False  # what `mixed_precision: no` in a file parses to
    assert load_spec(write(tmp_path, data)).train.mixed_precision == "no"
    data["train"]["mixed_precision"] = True  # yes/on/true: none of no/fp16/bf16 is such a word
    assert "train.mixed_precision" in _error(tmp_path, data)
    spec = load_spec(path, ["train.mixed_precision=no", "name=2024", "tracking.uri=null", "train.lambda_iso=1e-3"])
    assert spec.train.mixed_precision == "no" and spec.name == "2024" and spec.tracking.uri is None
    assert spec.train.lambda_iso == 1e-3  # numbers stay numbers
    with pytest.raises(SpecError, match="train.mixed_precision"):
        load_spec(path, ["train.mixed_precision=yes"])


def test_set_mixed_precision_no_through_the_cli(tmp_path):
    """The real command line, in its own process: `--set train.mixed_precision=no` validates (exit 0)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "isosweep.cli", "validate", str(ROOT / "search_spaces" / "demo.yaml"), "--set", "train.mixed_precision=no"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["train"]["mixed_precision"] == "no"
    bad = subprocess.run(cmd + ["--set", "name=.."], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "'name'" in bad.stderr and "fix" in bad.stderr


# --- preflight: the base model and the images, before Ray starts ---

def _fake_hub_cache(root: Path, repo_id: str, files: list[str]) -> Path:
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for name in files:
        f = repo / "snapshots" / ("0" * 40) / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    return root


def _spec_with_base(source, subfolder=None):
    from isosweep.spec import spec_from_dict

    return spec_from_dict({**demo_data(), "base_model": {"source": source, "subfolder": subfolder}}, check_paths=False)


def test_preflight_finds_a_hub_id_only_in_the_local_cache_when_offline(tmp_path, monkeypatch):
    from isosweep.commands.validate import check_base_model

    cache = _fake_hub_cache(tmp_path / "hub", "org/pipe", ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"])
    _fake_hub_cache(cache, "org/noweights", ["config.json"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "local HF cache" in check_base_model(_spec_with_base("org/pipe"), "s.yaml")
    assert "local HF cache" in check_base_model(_spec_with_base("org/pipe", "unet"), "s.yaml")
    for source, sub in (("org/missing", None), ("org/noweights", None), ("org/pipe", "vae")):
        with pytest.raises(SpecError) as exc:
            check_base_model(_spec_with_base(source, sub), "s.yaml")
        msg = str(exc.value)
        assert "s.yaml" in msg and "base_model.source" in msg and source in msg and f"hf download {source}" in msg
    with pytest.raises(SpecError, match="no local path, MLflow URI or hub id"):
        check_base_model(_spec_with_base("not a/valid id"), "s.yaml")


def test_preflight_checks_a_local_model_folder(tmp_path):
    from isosweep.commands.validate import check_base_model

    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    with pytest.raises(SpecError, match="no UNet config.json"):
        check_base_model(_spec_with_base(str(tmp_path / "pipe")), "s.yaml")
    (tmp_path / "pipe" / "unet" / "config.json").write_text("{}")
    assert "local folder" in check_base_model(_spec_with_base(str(tmp_path / "pipe")), "s.yaml")
    assert "built in" in check_base_model(_spec_with_base("builtin:shapes"), "s.yaml")
    with pytest.raises(SpecError, match="builtin:shapes"):
        _spec_with_base("builtin:faces")


@pytest.mark.slow  # an MLflow SQLite store: about 10 s of table creation
def test_preflight_looks_up_mlflow_models_at_their_server(tmp_path, monkeypatch):
    """models:/ base models: found (listed, not downloaded), missing, no server named, server unreachable."""
    from mlflow import MlflowClient

    from isosweep.commands.validate import check_base_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    files = tmp_path / "model"
    (files / "unet").mkdir(parents=True)
    (files / "unet" / "config.json").write_text("{}")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("base")
    version = client.create_model_version("base", source=files.as_uri())
    client.set_registered_model_alias("base", "champion", version.version)
    monkeypatch.setenv("ISOSWEEP_TRACKING_RETRIES", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert "models:/base@champion" in check_base_model(_spec_with_base("models:/base@champion"), "s.yaml", tracking_uri=uri)
    with pytest.raises(SpecError) as exc:
        check_base_model(_spec_with_base("models:/base@nope"), "s.yaml", tracking_uri=uri)
    assert "models:/base@nope" in str(exc.value) and "fix" in str(exc.value)
    with pytest.raises(SpecError, match="MLFLOW_TRACKING_URI"):
        check_base_model(_spec_with_base("models:/base@champion"), "s.yaml")
    with pytest.raises(SpecError) as exc:
        check_base_model(_spec_with_base("models:/base@champion"), "s.yaml", tracking_uri="http://127.0.0.1:9")
    assert "127.0.0.1:9" in str(exc.value) and "could not be reached" in str(exc.value) and "fix" in str(exc.value)


def test_validate_deep_names_unreadable_images(tmp_path, monkeypatch, capsys, standard_weights):
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("ISOSWEEP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "ok.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:500])
    data = demo_data()
    data["dataset"] = {"kind": "image_folder", "path": str(folder), "resolution": 8}
    # an image folder's FID/PPL need the standard networks: --deep also checks that their files are there
    data["evaluation"].update(backbone="standard", weights_dir=str(standard_weights.dir))
    spec = str(write(tmp_path, data))
    assert main(["validate", spec]) == 0  # without --deep the images are not decoded
    capsys.readouterr()
    assert main(["validate", spec, "--deep"]) == 2
    err = capsys.readouterr().err
    assert "cut.png" in err and "dataset.path" in err and "1 of 2" in err and "fix" in err
    (folder / "cut.png").unlink()
    assert main(["validate", spec, "--deep"]) == 0
    assert "all readable" in capsys.readouterr().err
    assert main(["validate", spec, "--deep", "--no-path-checks"]) == 2


def test_jacobian_timesteps_and_the_older_single_timestep(tmp_path):
    """evaluation.jacobian.timesteps is a list (default 999, 500, 100); a spec with the older `timestep: t` (one t)
    still loads, as timesteps [t]; both at once, or a repeated t, are refused naming the field."""
    from isosweep.spec import JacobianSpec, spec_from_dict

    assert JacobianSpec().timesteps == [999, 500, 100] and JacobianSpec().vor_norm == "global_mean"
    data = demo_data()
    data["evaluation"]["jacobian"] = {"num_samples": 4, "timestep": 500}
    assert spec_from_dict(data, check_paths=False).evaluation.jacobian.timesteps == [500]
    data["evaluation"]["jacobian"] = {"num_samples": 4, "timestep": 500, "timesteps": [999]}
    assert "evaluation.jacobian" in _error(tmp_path, data) and "timesteps" in _error(tmp_path, data)
    data["evaluation"]["jacobian"] = {"timesteps": [999, 999]}
    assert "evaluation.jacobian.timesteps" in _error(tmp_path, data)
    data["evaluation"]["jacobian"] = {"vor_norm": "per_sample"}
    assert "evaluation.jacobian.vor_norm" in _error(tmp_path, data) and "paper" in _error(tmp_path, data)


def test_a_sweep_saved_before_the_intervals_resumes_without_them():
    """A spec saved before evaluation.bootstrap existed had no intervals: resuming it keeps them off, so one sweep's
    rows all compare by value (results/pareto.py)."""
    from isosweep.spec.changes import spec_for_resume

    saved = load_spec(ROOT / "search_spaces" / "demo.yaml", check_paths=False).to_dict()
    del saved["evaluation"]["bootstrap"]
    assert spec_for_resume(saved, None, allow_changes=False, source="x").evaluation.bootstrap.resamples == 0


def test_a_sweep_saved_before_ppl_by_jvp_resumes_with_the_finite_difference():
    """A spec saved before evaluation.ppl.method existed resumes as it ran (finite difference, fp32), given again
    unchanged or not at all. (Should the default ever change, the old value goes into spec.sections.ADDED_FIELDS.)"""
    from isosweep.spec.changes import spec_for_resume

    spec = load_spec(ROOT / "search_spaces" / "demo.yaml", check_paths=False)
    saved = spec.to_dict()
    del saved["evaluation"]["ppl"]["method"], saved["evaluation"]["ppl"]["precision"]
    for given in (None, spec):
        ppl = spec_for_resume(saved, given, allow_changes=False, source="x").evaluation.ppl
        assert (ppl.method, ppl.precision) == ("finite_difference", "fp32")


def test_iso_batch_and_shared_forward_default_to_all_samples_and_are_validated(tmp_path):
    """train.iso_batch (null = every sample) and train.iso_shared_forward (off): a spec without them loads as before
    and trains as before; an iso_batch above the per-worker micro-batch, or not a positive integer, names the field;
    sharing under DDP needs a sample outside the iso sub-batch."""
    data = demo_data()
    for key in ("iso_batch", "iso_shared_forward"):
        data["train"].pop(key, None)
    spec = load_spec(write(tmp_path, data))
    assert spec.train.iso_batch is None and spec.train.iso_shared_forward is False
    per_worker = spec.train.per_worker_batch_size(spec.resources.workers_per_trial)
    ok = load_spec(write(tmp_path, data), [f"train.iso_batch={per_worker}", "train.iso_shared_forward=true"])
    assert ok.train.iso_batch == per_worker and ok.train.iso_shared_forward is True
    for bad in (0, -2, "two"):
        data = demo_data()
        data["train"]["iso_batch"] = bad
        msg = _error(tmp_path, data)
        assert "train.iso_batch" in msg and str(bad) in msg
    data = demo_data()
    data["train"]["iso_batch"] = per_worker + 1
    msg = _error(tmp_path, data)
    assert "train.iso_batch" in msg and f"at most {per_worker}" in msg
    data = demo_data()
    data["resources"]["workers_per_trial"] = 2
    data["train"]["global_batch_size"] = 8
    data["train"]["grad_accumulation"] = 1
    data["train"]["iso_shared_forward"] = True
    msg = _error(tmp_path, data)
    assert "train.iso_shared_forward" in msg and "train.iso_batch" in msg and "at most 3" in msg
    data["train"]["iso_batch"] = 3
    assert load_spec(write(tmp_path, data)).train.iso_batch == 3


def test_iso_every_defaults_to_every_step_and_is_validated(tmp_path):
    """train.iso_every: absent means 1 (the paper's every-step loss); 0, a fraction, or more than max_steps (the term
    would be taken once, n times heavier) are refused naming the field and the fix."""
    data = demo_data()
    data["train"].pop("iso_every", None)
    assert load_spec(write(tmp_path, data)).train.iso_every == 1
    assert load_spec(write(tmp_path, data), ["train.iso_every=4"]).train.iso_every == 4
    for bad in (0, 2.5):
        data = demo_data()
        data["train"]["iso_every"] = bad
        assert "train.iso_every" in _error(tmp_path, data)
    data = demo_data()
    data["train"]["max_steps"] = 3
    data["train"]["iso_every"] = 4
    msg = _error(tmp_path, data)
    assert "train.iso_every=4" in msg and "train.max_steps=3" in msg and "at most 3" in msg
