"""Fallbacks say so, once: AdamW without its fused kernel, and MFU that cannot be reported."""

from __future__ import annotations

import torch

from fledge.recipe import load_recipe
from fledge.train import loop, train
from tiny_runs import CUSTOM_ARCH, make_recipe


def test_unfused_adamw_and_an_unmeasurable_peak_are_each_said_once(tmp_path, monkeypatch, capsys):
    real = torch.optim.AdamW

    def adamw(params, *args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices")
        return real(params, *args, **kwargs)

    def matmul_peak(dtype, device):
        raise RuntimeError("no matmul for you")

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    monkeypatch.setattr(loop, "matmul_peak", matmul_peak)
    train(make_recipe(tmp_path, "notes", max_steps=2), progress=False)
    out = capsys.readouterr().out
    assert out.count("note: fused AdamW is not available here (`fused=True` requires") == 1
    assert out.count("note: MFU is not reported: measuring the torch.float32 matmul peak on cpu failed "
                     "(no matmul for you)") == 1
    assert "MFU" not in out.split("note: MFU")[1].split("\n", 1)[1]      # and no MFU column follows


def test_an_own_model_without_flops_per_token_says_why_there_is_no_mfu(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_plain.py").write_text(CUSTOM_ARCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = make_recipe(tmp_path, "plain", max_steps=2)
    recipe = load_recipe(None, base={**recipe.to_dict(), "model": {**recipe.to_dict()["model"],
                                                                    "arch": "my_plain:build"}})
    train(recipe, progress=False)
    assert capsys.readouterr().out.count("note: MFU is not reported: the model has no flops_per_token") == 1
