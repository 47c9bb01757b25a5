"""Faithful doubles of the Conductor Gateway and the CRM backend (see docs/upstreams.md)."""
