"""`isosweep submit SPEC`: a sweep submitted to a Ray cluster as a Ray job, then followed."""

from __future__ import annotations

import argparse
import shlex

from isosweep.console import note, result, result_json
from isosweep.constants import EXIT_COMPLETED, EXIT_ERROR, EXIT_INTERRUPTED, OVERRIDES_ENV
from isosweep.redact import scrub_text
from isosweep.spec import SpecError, load_spec
from isosweep.sweep import jobs


def submit_command(args: argparse.Namespace, command: str = "run") -> int:
    """`isosweep submit SPEC [--address URL] [--set K=V ...] [--env K[=V] ...] [--runtime-env FILE] [--resume]
    [--shared-fs] [--token T] [--no-wait]`.

    `command` is the isosweep command the job runs on the spec (`run`, or `resume` with --resume; tests
    use `validate`). Returns 0 when submitted with --no-wait, else the job's exit status (0 on success).
    A wrong argument raises SpecError (exit 2 from cli.main): a bad spec or --set, no address, a bad
    --env or --runtime-env, a storage path or tracking URI only one machine sees. 1 when the cluster
    cannot be reached or refuses the token, 130 when interrupted while following (the job keeps running).
    """
    as_json = bool(getattr(args, "json", False))
    if as_json and not getattr(args, "no_wait", False):
        raise SpecError("--json prints the submitted job as one JSON document, so it needs --no-wait (following the job "
                        "prints its logs); fix: add --no-wait, then `ray job logs JOB_ID --follow`")
    if command == "run" and getattr(args, "resume", False):
        command = "resume"
    trust_storage = bool(getattr(args, "trust_storage", False))
    if trust_storage and command != "resume":
        raise SpecError("--trust-storage only applies to a resume; fix: add --resume, or leave it out")
    address, address_source = jobs.resolve_address(getattr(args, "address", None))
    overrides = list(getattr(args, "overrides", None) or [])
    # schema, ranges and --set here; paths (dataset.path, weights) are the cluster's, checked by the job
    spec = load_spec(args.spec, overrides, check_paths=False)
    runtime_env_file = getattr(args, "runtime_env", None)
    file_env = jobs.load_runtime_env(runtime_env_file) if runtime_env_file else {}
    env_items = jobs.parse_env_items(list(getattr(args, "env_items", None) or []))
    user_env = jobs.job_runtime_env(file_env, env_items, overrides)
    env_vars = user_env.get("env_vars", {})
    shared_fs = bool(getattr(args, "shared_fs", False))
    jobs.check_shared_places(spec, env_vars, shared_fs, scrub_text(str(args.spec)))
    note(f"ok: {scrub_text(str(args.spec))} is a valid sweep spec ({spec.name}); paths are checked on the cluster")

    token, source = jobs.resolve_token(getattr(args, "token", None))
    try:
        client = jobs.connect(address, token, source, address_source)
        package = jobs.build_package(args.spec, user_env)
        entrypoint = jobs.build_entrypoint(package.spec_arg, command=command, shared_fs=shared_fs, allow_changes=bool(overrides),
                                           trust_storage=trust_storage)
        job_id = jobs.submit(client, entrypoint, package, spec)
    except jobs.JobSubmitError as exc:
        note(f"error: {scrub_text(str(exc))}")
        return EXIT_ERROR
    # the resolved http:// URL; scrubbed, since an address may carry user:password@
    base = scrub_text(getattr(client, "_address", jobs.dashboard_address(address, address_source)))
    addr = shlex.quote(base)
    # names only: values (credentials among them) stay in the job's runtime env; isosweep's own are not the user's
    names = sorted(k for k in env_vars if k not in (OVERRIDES_ENV, jobs.JOB_STOP_WAIT_ENV) or k in env_items)
    keys = [scrub_text(item.partition("=")[0]) for item in overrides]
    commands = {"dashboard": f"{base}/#/jobs/{job_id}", "logs": f"ray job logs {job_id} --address {addr} --follow",
                "stop": f"ray job stop {job_id} --address {addr}"}
    if as_json:
        result_json({"job_id": job_id, "address": base, "entrypoint": scrub_text(entrypoint), "env": names, "set": keys,
                     **commands})
        return EXIT_COMPLETED
    result(f"submitted job: {job_id}")
    result(f"entrypoint:    {scrub_text(entrypoint)}")
    if names:
        result(f"env:           {' '.join(names)} (values not shown)")
    if overrides:
        result(f"--set:         {' '.join(keys)} (values not shown; they travel in {OVERRIDES_ENV})")
    result(f"dashboard:     {commands['dashboard']}")
    result(f"logs:          {commands['logs']}")
    result(f"stop:          {commands['stop']}")
    if getattr(args, "no_wait", False):
        return EXIT_COMPLETED
    try:
        status = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        note(f"\nstopped following; the job keeps running. Stop it with: ray job stop {job_id} --address {addr}")
        return EXIT_INTERRUPTED
    code = jobs.job_exit_code(client, job_id, status)
    note(f"job {job_id}: {status} (exit code {code})")
    if status != "SUCCEEDED":
        message = client.get_job_info(job_id).message
        if message:
            note(f"ray: {scrub_text(message)}")
        return code or EXIT_ERROR
    return EXIT_COMPLETED
