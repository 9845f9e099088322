"""loramix.ffn_spec: which child of an FFN is the gate, up and down projection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.tiny_models import decoder_mlps, tiny_model
from loramix.ffn_spec import FFNNotSupportedError, check_targets, detect_ffn, linear_shape, linear_weight


@pytest.mark.parametrize(("arch", "gated", "roles"), [
    ("llama", True, ["gate", "up", "down"]), ("qwen2", True, ["gate", "up", "down"]),
    ("gemma", True, ["gate", "up", "down"]), ("gpt2", False, ["up", "down"]),
])
def test_detects_the_projections_of_known_families(arch, gated, roles):
    mlp = decoder_mlps(tiny_model(arch))[0]
    spec = detect_ffn(mlp)
    assert spec.gated == gated and spec.roles() == roles
    assert check_targets(spec, None, mlp) == roles
    assert (spec.dropout == "dropout") == (arch == "gpt2")  # GPT-2's FFN has its own output dropout


class OddFFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.out = nn.Linear(8, 4)
        self.act = nn.GELU()


def test_unknown_layouts_are_refused_naming_the_children_and_the_fix():
    with pytest.raises(FFNNotSupportedError, match=r"OddFFN has no recognised FFN projections.*inp \(Linear\), "
                                                   r"out \(Linear\).*ffn_names"):
        detect_ffn(OddFFN())
    spec = detect_ffn(OddFFN(), {"up": "inp", "down": "out"})
    assert spec.up == "inp" and spec.down == "out" and spec.act == "act" and not spec.gated


def test_targets_the_ffn_lacks_are_refused():
    mlp = decoder_mlps(tiny_model("gpt2"))[0]
    with pytest.raises(FFNNotSupportedError, match=r"expert_targets asks for \['gate'\]"):
        check_targets(detect_ffn(mlp), ["gate", "up"], mlp)


def test_linear_shape_and_weight_read_linear_and_gpt2_conv1d_alike():
    llama, gpt2 = decoder_mlps(tiny_model("llama"))[0], decoder_mlps(tiny_model("gpt2"))[0]
    assert linear_shape(llama.up_proj) == (32, 64) and linear_shape(gpt2.c_fc) == (32, 128)
    x = torch.randn(3, 32)
    for module in (llama.up_proj, gpt2.c_fc):  # (out, in) whichever layout is stored
        bias = module.bias if module.bias is not None else 0.0
        torch.testing.assert_close(module(x), x @ linear_weight(module).t() + bias)
