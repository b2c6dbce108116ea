"""Model definitions, one folder per model (like transformers' `models/`)."""
