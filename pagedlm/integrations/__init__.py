"""Integrations with other systems (imported lazily; each needs its own extra)."""
