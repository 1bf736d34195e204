"""The sweep spec: one typed, validated YAML file per sweep, and every rule about it.

- `fields`: what every section shares (the strict base, finite floats, YAML boolean words, `SpecError`, `--set`);
- `evaluation`: the `evaluation:` section and the metric names every part of isosweep uses;
- `sections`: the other sections and the root `SweepSpec`, with the trial keys and the baseline;
- `load`: YAML (merged along `extends`) and `--set` in, a validated spec or one `SpecError` line out; one trial's spec;
- `changes`: what a resume may change; `reference`: the README's field table, generated from the schema.

The names below are the spec's public face: `from isosweep.spec import load_spec, SweepSpec, SpecError`.
"""

from isosweep.spec.evaluation import (
    EVAL_METRICS, INTERVAL_METRICS, RESULT_METRICS, BootstrapSpec, CheckpointFidSpec, EvaluationSpec, FidSpec, JacobianSpec,
    LsSpec, PplSpec, RtlSpec, base_metric, is_result_metric, register_result_names, timestep_metric,
)
from isosweep.spec.fields import SpecError
from isosweep.spec.load import (
    apply_overrides, deep_merge, load_spec, planned_trials, resolve_spec_data, resolve_trial_spec, spec_chain, spec_from_dict,
    trial_params_of,
)
from isosweep.spec.sections import (
    ADDED_FIELDS, BASELINE_PARAMS, POINT_KEYS, RENAMED_FIELDS, TRIAL_KEYS, BaseModelSpec, DatasetSpec, Distribution,
    ResourcesSpec, SearchSpec, SelectionSpec, StorageSpec, SweepSpec, TrackingSpec, TrainSpec, TrialPoint,
)

__all__ = [
    "ADDED_FIELDS", "BASELINE_PARAMS", "EVAL_METRICS", "INTERVAL_METRICS", "POINT_KEYS", "RENAMED_FIELDS", "RESULT_METRICS",
    "TRIAL_KEYS", "BaseModelSpec", "BootstrapSpec", "CheckpointFidSpec", "DatasetSpec", "Distribution", "EvaluationSpec",
    "FidSpec", "JacobianSpec", "LsSpec", "PplSpec", "ResourcesSpec", "RtlSpec", "SearchSpec", "SelectionSpec", "SpecError",
    "StorageSpec", "SweepSpec", "TrackingSpec", "TrainSpec", "TrialPoint", "apply_overrides", "base_metric", "deep_merge",
    "is_result_metric", "load_spec", "planned_trials", "register_result_names", "resolve_spec_data", "resolve_trial_spec", "spec_chain", "spec_from_dict",
    "timestep_metric", "trial_params_of",
]
