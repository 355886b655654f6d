"""Worked examples that plug into fledge (model.arch: examples.recurrent:build); run fledge from the repository root so they import."""
