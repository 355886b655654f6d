"""`fledge quickstart`, shortened: it builds its corpus from the standard library, trains, and
the model ends well below the unigram entropy of the corpus (it learned context, not just
token frequencies). The CLI form is checked once for its closing advice."""

from __future__ import annotations

import json

import pytest

from fledge.evaluate.loss import unigram_entropy
from fledge.quickstart import quickstart
from fledge.train.data import TokenStream


@pytest.mark.slow
def test_shortened_quickstart_learns(tmp_path, capsys):
    result = quickstart(steps=100, corpus_mb=0.6, run_dir=tmp_path / "qs", progress=False)
    manifest = json.loads((tmp_path / "qs" / "data" / "manifest.json").read_text())
    entropy = unigram_entropy(TokenStream(tmp_path / "qs" / "data", "train"), manifest["tokenizer"]["vocab_size"])
    assert result.final_val_loss < entropy - 0.75, (result.final_val_loss, entropy)
    assert result.final_val_loss < result.first_val_loss - 2.0
    out = capsys.readouterr().out
    assert "fledge sample" in out and str(tmp_path / "qs") in out
    assert (result.best_checkpoint / "model.safetensors").is_file()
    assert f"its report: {tmp_path / 'qs' / 'report.html'}" in out and (tmp_path / "qs" / "report.html").is_file()
