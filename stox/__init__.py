"""Stox: a workflow-orchestration gateway for product uploads."""
