"""Files other tools load: transformers folders (hf.py)."""
