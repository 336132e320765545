"""gatemix: one OpenAI-compatible endpoint over K domain experts, mixed per token by a robust gate."""

__version__ = "0.1.0"
