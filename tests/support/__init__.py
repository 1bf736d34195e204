"""Test support: stand-ins for what tests cannot download (hub models, photographs, metric weights)."""
