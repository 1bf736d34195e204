"""`isosweep submit SPEC`: a sweep submitted to a Ray cluster as a Ray job, then followed."""

from __future__ import annotations

import argparse
import shlex
import sys

from isosweep.config import load_spec
from isosweep.sweep import jobs


def submit_command(args: argparse.Namespace, command: str = "run") -> int:
    """`isosweep submit SPEC --address http://HEAD:8265 [--set K=V ...] [--token T] [--no-wait]`.

    `command` is the isosweep command the job runs on the spec (`run`; tests use `validate`).
    Returns 0 when submitted with --no-wait, else the job's exit status (0 on success); 1 when the
    cluster cannot be reached or refuses the token (the message says why and how to fix it), 130 when
    interrupted while following (the job keeps running).
    """
    overrides = list(getattr(args, "overrides", None) or [])
    # schema, ranges and --set here; paths (dataset.path, weights) are the cluster's, checked by the job
    spec = load_spec(args.spec, overrides, check_paths=False)
    print(f"ok: {args.spec} is a valid sweep spec ({spec.name}); paths are checked on the cluster", file=sys.stderr)
    if command in ("run", "resume") and "://" not in spec.storage.path:
        print(
            f"warning: storage.path is the local path {spec.storage.path!r}: unless every node mounts it (NFS), "
            "trial workers on other nodes cannot write there; use --set storage.path=s3://BUCKET/PREFIX",
            file=sys.stderr,
        )
    token, source = jobs.resolve_token(getattr(args, "token", None))
    try:
        client = jobs.connect(args.address, token, source)
        package = jobs.build_package(args.spec)
        entrypoint = jobs.build_entrypoint(package.spec_arg, overrides, command=command)
        job_id = jobs.submit(client, entrypoint, package, spec)
    except jobs.JobSubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    base = getattr(client, "_address", jobs.dashboard_address(args.address))  # the resolved http:// URL
    addr = shlex.quote(base)
    print(f"submitted job: {job_id}")
    print(f"entrypoint:    {entrypoint}")
    print(f"dashboard:     {base}/#/jobs/{job_id}")
    print(f"logs:          ray job logs {job_id} --address {addr} --follow")
    print(f"stop:          ray job stop {job_id} --address {addr}")
    if getattr(args, "no_wait", False):
        return 0
    try:
        status = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: ray job stop {job_id} --address {addr}", file=sys.stderr)
        return 130
    code = jobs.job_exit_code(client, job_id, status)
    print(f"job {job_id}: {status} (exit code {code})", file=sys.stderr)
    if status != "SUCCEEDED":
        message = client.get_job_info(job_id).message
        if message:
            print(f"ray: {message}", file=sys.stderr)
        return code or 1
    return 0
