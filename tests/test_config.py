"""MixLoraConfig validation and (de)serialisation."""

from __future__ import annotations

import json

import pytest

from helpers.tiny_models import decoder_mlps, module_types, tiny_model
from loramix import ConfigError, MixLoraConfig, inject
from loramix.config import EXPERT_TYPES, ROUTERS
from loramix.moe_layer import MixLoraFFN


def test_defaults_are_valid() -> None:
    """The default config validates and describes the MixLoRA recipe (8 experts, top-2, rank 8)."""
    cfg = MixLoraConfig()
    assert (cfg.num_experts, cfg.top_k, cfg.r, cfg.router, cfg.expert_type) == (8, 2, 8, "topk", "mixlora")
    assert cfg.scaling == pytest.approx(16.0 / 8)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_every_router_and_expert_type_is_accepted(router: str, expert_type: str) -> None:
    """Every registered router name and expert type is a valid choice."""
    cfg = MixLoraConfig(router=router, expert_type=expert_type)
    assert (cfg.router, cfg.expert_type) == (router, expert_type)


def test_rslora_scaling() -> None:
    """use_rslora scales by alpha / sqrt(r) instead of alpha / r."""
    assert MixLoraConfig(r=16, alpha=32, use_rslora=True).scaling == pytest.approx(32 / 4)
    assert MixLoraConfig(r=16, alpha=32).scaling == pytest.approx(2.0)


# (field expected in the message, constructor kwargs)
INVALID = [
    ("num_experts", dict(num_experts="8")),
    ("num_experts", dict(num_experts=2.5)),
    ("num_experts", dict(num_experts=True)),
    ("num_experts", dict(num_experts=-1)),
    ("num_experts", dict(num_experts=[])),
    ("num_experts", dict(num_experts=[4, -2])),
    ("num_experts", dict(num_experts=[4, 2.0])),
    ("num_experts", dict(num_experts={0: -1})),
    ("num_experts", dict(num_experts={-1: 4})),
    ("num_experts", dict(num_experts={"first": 4})),
    ("default_num_experts", dict(num_experts={0: 4}, default_num_experts=-1)),
    ("top_k", dict(num_experts=2, top_k=3)),
    ("top_k", dict(num_experts=[4, 1], top_k=2)),
    ("top_k", dict(num_experts={0: 4}, default_num_experts=1, top_k=2)),
    ("top_k", dict(router="noisy_topk", num_experts=2, top_k=3)),
    ("top_k", dict(top_k=0)),
    ("top_k", dict(top_k=1.5)),
    ("router", dict(router="expert_choice")),
    ("router", dict(router="TopK")),
    ("expert_type", dict(expert_type="lora")),
    ("r", dict(r=0)),
    ("r", dict(r=4.0)),
    ("r", dict(r="8")),
    ("attn_r", dict(attn_r=4.0)),
    ("default_num_experts", dict(default_num_experts="8")),
    ("use_rslora", dict(use_rslora="false")),
    ("alpha", dict(alpha=0)),
    ("alpha", dict(alpha="16")),
    ("dropout", dict(dropout=-0.1)),
    ("dropout", dict(dropout=1.0)),
    ("dropout", dict(dropout=None)),
    ("attn_dropout", dict(attn_dropout=1.5)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.01)),
    ("capacity_factor", dict(capacity_factor=0.0)),
    ("capacity_factor", dict(capacity_factor=-1.0)),
    ("router_init_scale", dict(router_init_scale=-0.1)),
    ("router_jitter", dict(router_jitter=1.0)),
    ("router_jitter", dict(router_jitter=-0.1)),
    ("expert_targets", dict(expert_targets=["gate", "ffn"])),
    ("expert_targets", dict(expert_targets=["q_proj"])),
    ("expert_targets", dict(expert_targets=[])),
    ("expert_targets", dict(expert_targets="up")),
    ("attn_targets", dict(attn_targets="q_proj")),
    ("attn_r", dict(attn_r=-1)),
    ("attn_alpha", dict(attn_alpha=0)),
    ("balance_coef", dict(balance_coef=-0.01)),
    ("z_loss_coef", dict(z_loss_coef=-1.0)),
    ("ffn_names", dict(ffn_names={"gate": "w1", "middle": "w3"})),
]


@pytest.mark.parametrize(("field", "kwargs"), INVALID, ids=[f"{f}-{kw}" for f, kw in INVALID])
def test_invalid_value_raises_config_error_naming_the_field(field: str, kwargs: dict) -> None:
    """Each invalid value or combination raises ConfigError whose message names the offending field."""
    with pytest.raises(ConfigError, match=rf"MixLoraConfig\.{field}\b"):
        MixLoraConfig(**kwargs)


def test_top_k_bound_ignores_zero_expert_layers_and_non_topk_routers() -> None:
    """top_k is checked against the smallest *non-zero* count, and only for routers that use top_k."""
    MixLoraConfig(num_experts=[4, 0], top_k=2)  # 0 = untouched layer, not a 0-expert MoE
    MixLoraConfig(num_experts=2, top_k=3, router="dense")
    MixLoraConfig(num_experts=2, top_k=3, router="switch")


def test_zero_experts_everywhere_is_allowed() -> None:
    """num_experts=0 is valid: attention-only LoRA with untouched FFNs."""
    assert MixLoraConfig(num_experts=0).experts_for_layer(0, 2) == 0


def test_dict_num_experts_keys_become_ints() -> None:
    """String layer keys (as JSON/YAML produce them) are normalised to ints."""
    cfg = MixLoraConfig(num_experts={"1": 4}, default_num_experts=2)
    assert cfg.num_experts == {1: 4}
    assert [cfg.experts_for_layer(i, 3) for i in range(3)] == [2, 4, 2]


@pytest.mark.parametrize(
    "num_experts",
    [[4, 4, 4], [4], {2: 4}, {5: 4, 0: 2}],
    ids=["list-too-long", "list-too-short", "dict-index-2", "dict-index-5"],
)
def test_per_layer_counts_must_fit_the_model_at_inject(num_experts) -> None:
    """A per-layer list of the wrong length (or a dict with an out-of-range layer) is refused at inject,
    naming num_experts and the model's layer count, before the model is changed."""
    model = tiny_model("llama")  # 2 layers
    before = module_types(model)
    cfg = MixLoraConfig(num_experts=num_experts)  # valid on its own: the model is unknown here
    with pytest.raises(ConfigError, match=r"MixLoraConfig\.num_experts.*2 layers"):
        inject(model, cfg)
    assert module_types(model) == before
    assert not hasattr(model, "loramix_state")
    assert all(p.requires_grad for p in model.parameters())


def test_per_layer_counts_that_fit_are_used() -> None:
    """A list with one count per layer gives each layer its own expert count."""
    model = inject(tiny_model("llama"), MixLoraConfig(num_experts=[3, 5], top_k=2))
    mlps = decoder_mlps(model)
    assert all(isinstance(m, MixLoraFFN) for m in mlps)
    assert [m.num_experts for m in mlps] == [3, 5]
    assert [m.mixlora_router.weight.shape[0] for m in mlps] == [3, 5]


CONFIGS_TO_SAVE = [
    MixLoraConfig(),
    MixLoraConfig(num_experts={0: 4, 3: 0}, default_num_experts=6, top_k=1, router="switch",
                  capacity_factor=2.0),
    MixLoraConfig(num_experts=[2, 0, 4], expert_targets=["up", "down"], attn_targets=["q_proj", "v_proj"],
                  expert_type="adapter", use_rslora=True, ffn_names={"gate": "w1", "up": "w3", "down": "w2"},
                  z_loss_coef=0.001, entropy_coef=-0.01, router_jitter=0.1, top_p=0.5, dropout=0.0),
]


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
@pytest.mark.parametrize("cfg", CONFIGS_TO_SAVE, ids=["default", "dict-experts", "list-experts"])
def test_save_load_round_trip(tmp_path, cfg: MixLoraConfig, suffix: str) -> None:
    """save() then load() gives an equal config for JSON and YAML, dict layer keys coming back as ints."""
    path = tmp_path / f"cfg{suffix}"
    cfg.save(path)
    loaded = MixLoraConfig.load(path)
    assert loaded == cfg
    if isinstance(cfg.num_experts, dict):
        assert all(isinstance(k, int) for k in loaded.num_experts)


def test_saved_json_is_plain_json(tmp_path) -> None:
    """The JSON file is readable by any JSON parser and names every field."""
    MixLoraConfig(num_experts={1: 4}).save(tmp_path / "c.json")
    d = json.loads((tmp_path / "c.json").read_text())
    assert d["num_experts"] == {"1": 4}
    assert set(d) == set(MixLoraConfig().to_dict())


def test_unknown_keys_are_refused() -> None:
    """from_dict rejects unknown keys (typos must not be silently ignored) and names them."""
    with pytest.raises(ConfigError, match="num_expert"):
        MixLoraConfig.from_dict({"num_expert": 4})


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_unknown_keys_in_a_file_are_refused(tmp_path, suffix: str) -> None:
    """A config file with an unknown key fails to load with ConfigError naming the key."""
    path = tmp_path / f"c{suffix}"
    path.write_text('{"top_k": 1, "learning_rate": 0.1}')  # JSON is valid YAML too
    with pytest.raises(ConfigError, match="learning_rate"):
        MixLoraConfig.load(path)


def test_invalid_value_in_a_file_is_refused(tmp_path) -> None:
    """Values read from a file are validated like constructor arguments."""
    path = tmp_path / "c.yaml"
    path.write_text("router: mystery\n")
    with pytest.raises(ConfigError, match=r"MixLoraConfig\.router"):
        MixLoraConfig.load(path)


def test_non_mapping_file_is_refused(tmp_path) -> None:
    """A file that is not a mapping of fields (e.g. a YAML list) raises ConfigError."""
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        MixLoraConfig.load(path)


def test_missing_file_raises_file_not_found(tmp_path) -> None:
    """Loading a path that does not exist raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        MixLoraConfig.load(tmp_path / "nope.json")


def test_experts_per_token() -> None:
    """The per-token expert bound matches each router's rule."""
    assert MixLoraConfig(top_k=3).experts_per_token(8) == 3
    assert MixLoraConfig(router="switch").experts_per_token(8) == 1
    assert MixLoraConfig(router="dense").experts_per_token(8) == 8
    assert MixLoraConfig(router="top_p").experts_per_token(8) == 8


@pytest.mark.parametrize("num_experts", [0, [0, 0], {0: 0, 1: 0}])
def test_a_config_that_trains_nothing_is_refused(num_experts) -> None:
    """No expert in any layer and no attention LoRA would leave nothing to train: refused at config time,
    naming both fields; either one alone is fine."""
    kwargs = {"default_num_experts": 0} if isinstance(num_experts, dict) else {}
    with pytest.raises(ConfigError, match=r"MixLoraConfig\.num_experts: .*attn_r is 0"):
        MixLoraConfig(num_experts=num_experts, attn_r=0, **kwargs)
    assert MixLoraConfig(num_experts=num_experts, attn_r=4, **kwargs).attn_r == 4
    assert MixLoraConfig(num_experts=2, attn_r=0).num_experts == 2


@pytest.mark.parametrize("suffix, text, where", [(".yaml", "r: 8\nrouter: [topk\n", "line 3"),
                                                 (".json", '{"r": 8,\n "router" "topk"}', "line 2")])
def test_syntax_error_in_a_file_names_the_file_and_line(tmp_path, suffix: str, text: str, where: str) -> None:
    """A YAML/JSON syntax error is a ConfigError naming the file and the line, not a parser traceback."""
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"c\{suffix}: not valid .*{where}"):
        MixLoraConfig.load(path)
