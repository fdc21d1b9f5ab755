"""Executions: the protocol between the API, the agent runner and the CLI (contract.py, messages.py)."""
