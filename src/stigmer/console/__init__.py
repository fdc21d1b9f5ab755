"""Stigmer's web console: the server, chat with agents, executions, approvals, agents and models in the
browser, served by the API on its own port (routes.py; its door: door.py; `stigmer ui` signs in)."""
