"""Thin routers: fetch the service from ``app.state``, call it, return."""
