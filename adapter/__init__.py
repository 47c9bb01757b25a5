"""CRM AI sidecar: CRM-shaped AI routes served by Conductor Gateway agents."""

__version__ = "0.1.0"
