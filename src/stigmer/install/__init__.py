"""Installing programs published as GitHub-style releases (the Local LLM runtime, the Temporal CLI).

platform (which OS and CPU), release (what a release is and how it is laid out: pure), installer (fetch,
verify, unpack, switch), temporal (the Temporal CLI's release). A program's own asset table lives with
the program (llm/ollama/assets.py).
"""
