"""Operator commands run from the CLI (provisioning phones), not by the server."""
