"""The seal of a sweep's Tune state: an HMAC-SHA256 of every file Tune unpickles when it restores the sweep.

`Tuner.restore` must unpickle `tuner.pkl`, `experiment_state-*.json` (embedded cloudpickle) and the searcher states,
and unpickling runs code: whoever can write the bucket would run code on the machine that resumes the sweep. So the
driver seals each of those files as it writes them, with a key that never goes to storage (`ISOSWEEP_STATE_KEY`, else
`~/.isosweep/state.key`), into `<sweep>/isosweep_state.seal`; `isosweep resume` restores only a sweep whose every such
file carries a valid seal (or with `--trust-storage`, when the user trusts whoever can write the bucket).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from isosweep import storage as st
from isosweep.constants import STATE_KEY_ENV
from isosweep.redact import scrub_text
from isosweep.results.layout import OWN_JSON, SEAL_FILE
from isosweep.spec import SpecError

KEEP = 4  # seals kept per file name: the file in storage may lag the driver's newest copy by an upload or two


def is_tune_state(name: str) -> bool:
    """Whether a file at the sweep's top level is Tune's (restored by unpickling) rather than isosweep's own JSON."""
    return name.endswith((".pkl", ".json")) and name not in OWN_JSON


def state_key() -> bytes:
    """The sealing key: ISOSWEEP_STATE_KEY, else ~/.isosweep/state.key (32 random bytes, made on first use, 0600)."""
    given = os.environ.get(STATE_KEY_ENV)
    if given:
        return given.encode()
    path = Path.home() / ".isosweep" / "state.key"
    if not path.is_file():
        st.make_private_dirs(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def mac(key: bytes, name: str, data: bytes) -> str:
    """The seal of one file: its name and bytes (a sealed file moved to another name does not pass)."""
    return hmac.new(key, name.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def read_seals(sweep: str) -> dict[str, list[str]]:
    """The seals stored with the sweep (a forged entry is harmless: without the key it matches nothing)."""
    try:
        seals = st.read_json(st.join(sweep, SEAL_FILE)) or {}
    except (OSError, ValueError):
        return {}
    return {str(k): [str(m) for m in v] for k, v in seals.items() if isinstance(v, list)}


def add_seals(seals: dict[str, list[str]], files: dict[str, bytes], key: bytes) -> bool:
    """Add the seals of `files` (name -> bytes) to `seals`, the newest first; whether anything changed."""
    changed = False
    for name, data in files.items():
        m = mac(key, name, data)
        kept = seals.get(name, [])
        if not kept or kept[0] != m:
            seals[name] = [m, *[k for k in kept if k != m]][:KEEP]
            changed = True
    return changed


def write_seals(sweep: str, seals: dict[str, list[str]]) -> None:
    st.write_json(st.join(sweep, SEAL_FILE), seals)


def seal_stored(sweep: str, names: list[str]) -> None:
    """Seal files as they are in storage now, right after this process wrote them (`tuner.pkl`)."""
    key, seals = state_key(), read_seals(sweep)
    files = {n: st.read_bytes(st.join(sweep, n)) for n in names}
    if add_seals(seals, {n: d for n, d in files.items() if d is not None}, key):
        write_seals(sweep, seals)


def unsealed(sweep: str) -> list[str]:
    """Tune's files at the sweep's top level without a valid seal (empty: the sweep may be restored)."""
    key, seals = state_key(), read_seals(sweep)
    bad = []
    for name in sorted(st.list_files(sweep)):
        if not is_tune_state(name):
            continue
        data = st.read_bytes(st.join(sweep, name))
        if data is None or not any(hmac.compare_digest(mac(key, name, data), m) for m in seals.get(name, [])):
            bad.append(name)
    return bad


def refuse_unsealed(sweep: str) -> None:
    """A SpecError (exit 2) naming the first of Tune's files without a valid seal, and the fix; nothing was unpickled."""
    bad = unsealed(sweep)
    if bad:
        more = f" (and {len(bad) - 1} more: {', '.join(bad[1:])})" if len(bad) > 1 else ""
        raise SpecError(f"{scrub_text(st.join(sweep, bad[0]))}{more}: Tune's state without a valid seal of this machine's "
                        f"{STATE_KEY_ENV} or ~/.isosweep/state.key, and restoring it would run code from it; fix: resume with "
                        "the key of the machine that ran the sweep, or pass --trust-storage if you trust whoever can write "
                        "this storage")
