"""Stigmer's own OpenAI-compatible endpoint, on the API's port: the configured model (whatever the provider)
and every agent (`agent/NAME`, answered by a durable execution) at one URL, reached with the API token or a
scoped key (`stigmer key create`)."""
