"""Built-in agent tools as plain Python: workspace files, a shell command, an HTTP fetch.

Nothing here imports pydantic-ai or Temporal, so an activity can call these functions directly. A
failure the model should read (a missing file, a host not allowed, a path that leaves the workspace)
is raised as `ToolFailure`; the caller turns it into a tool result so that the agent can go on.
"""
