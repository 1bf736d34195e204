"""The tracking layer's name for the scrubber: every param, tag, logged text and message passes through it.

The rules live in `isosweep.redact` (standard library only, layer 0), so layers below tracking (the
report) and the CLI's error handler scrub with the same rules; this module only re-exports them.
"""

from __future__ import annotations

from isosweep.redact import REDACTED, format_exception_scrubbed, is_secret_key, scrub, scrub_headers, scrub_text, scrub_tree

__all__ = ["REDACTED", "format_exception_scrubbed", "is_secret_key", "scrub", "scrub_headers", "scrub_text", "scrub_tree"]
