"""What a user's scripts and a submitted job rely on, defined once: the exit codes of `isosweep` and the names of the
environment variables isosweep itself writes (stdlib only; read by the CLI, the job submitter and the sweep states).
The table of exit codes for users is the README's "Exit codes"; each code means one thing, so a script can tell a
sweep that ran to its end without a champion (5) from a crash (1)."""

# Exit codes of every `isosweep` command, pairwise distinct.
EXIT_COMPLETED = 0  # done (for a sweep: completed and a champion chosen, promoted when the spec registers it)
EXIT_ERROR = 1  # it did not do what was asked: an unexpected error or an outage (one line; -v adds the traceback)
EXIT_SPEC_ERROR = 2  # bad spec or arguments, refused before anything ran
EXIT_FAILED = 3  # some trials errored: `isosweep resume` runs them again
EXIT_SWEEP_BUSY = 4  # `isosweep resume` refused: another driver is running that sweep (its lease is live)
EXIT_NO_CHAMPION = 5  # a sweep completed, but no champion could be chosen or promoted (e.g. the baseline failed)
EXIT_NOT_RUNNING = 6  # `isosweep stop`: nothing to stop, no live driver holds that sweep
EXIT_INTERRUPTED = 130  # stopped before the end (Ctrl-C): `isosweep resume` continues
EXIT_TERMINATED = 143  # the same, stopped by SIGTERM (`ray job stop`, Kubernetes, Slurm): 128 + 15, as a shell reports it

# --set items from the environment: a JSON list of "KEY=VALUE" strings that `isosweep` appends after the command
# line's --set. `isosweep submit` puts a job's --set items here so that their values stay out of its entrypoint.
OVERRIDES_ENV = "ISOSWEEP_OVERRIDES"
# The defaults of --storage and --tracking-uri for every verb that takes them: the flag, then the variable, then the
# spec (`storage.path`; `tracking.uri`, then MLFLOW_TRACKING_URI, then the local store under the storage path).
STORAGE_ENV = "ISOSWEEP_STORAGE"
TRACKING_URI_ENV = "ISOSWEEP_TRACKING_URI"
# The key that seals Tune's pickled state of a sweep (`results.seal`): text, the same on every machine that runs or
# resumes the sweep; without it, `~/.isosweep/state.key` (made on first use). It never goes to storage.
STATE_KEY_ENV = "ISOSWEEP_STATE_KEY"
