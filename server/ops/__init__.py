"""Operator commands run from the CLI (provisioning phones, the `devices` report), not by the server."""
