"""Collapse diagnostics: pure detectors shared by the live monitor and the offline `diagnose`."""
