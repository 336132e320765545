"""The ensemble distilled into one student model that vLLM serves alone (see README.md)."""
