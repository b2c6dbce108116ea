"""hope-hf: Nested Learning and HOPE for the Hugging Face ecosystem."""

__version__ = "0.1.0"
