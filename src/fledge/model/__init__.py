"""Model code: fledge's own decoder (`gpt.py`) and the architecture registry."""
