"""Deployment artefacts that are generated from code (deploy/grafana)."""
