import json

import pytest

from mmrec import ConfigError, MMRecConfig


def test_defaults_follow_the_spec():
    config = MMRecConfig(vocab_size=100)
    assert (config.model_dim, config.num_layers, config.num_heads) == (4096, 24, 8)
    assert config.ffn_dim == 4 * 4096 and config.inner_dim == 4096 // 4
    assert (config.ffn_act, config.ffn_gated, config.tie_word_embeddings) == ("gelu", False, True)
    assert (config.memory_slots, config.hds_levels, config.memory_segment_len) == (1024, 3, 8192)
    assert config.pooled_slots == 64
    assert (config.dropout, config.norm_eps) == (0.1, 1e-6)


def test_derived_defaults_follow_model_dim():
    config = MMRecConfig(vocab_size=10, model_dim=64, num_heads=4)
    assert config.ffn_dim == 256 and config.inner_dim == 16


def test_json_round_trip_keeps_unknown_fields(tmp_path):
    config = MMRecConfig(vocab_size=10, model_dim=64, num_heads=4, ffn_gated=True, ffn_act="silu",
                         extra={"architectures": ["X"]})
    config.save(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "mmrec" and data["architectures"] == ["X"]
    again = MMRecConfig.load(tmp_path)
    assert again == config
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("field, value, words", [
    ("model_dim", 0, "model_dim"),
    ("num_heads", 3, "num_heads"),
    ("ffn_act", "relu", "ffn_act"),
    ("memory_slots", 10, "memory_slots"),
    ("num_layers", -1, "num_layers"),
    ("dropout", 1.5, "dropout"),
    ("ffn_gated", "yes", "ffn_gated"),
    ("vocab_size", 2.5, "vocab_size"),
])
def test_bad_values_name_the_field(field, value, words):
    kwargs = {"vocab_size": 10, "model_dim": 64, "num_heads": 4, field: value}
    with pytest.raises(ConfigError, match=words):
        MMRecConfig(**kwargs)


def test_missing_vocab_size_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mmrec", "model_dim": 64}))
    with pytest.raises(ConfigError, match="vocab_size"):
        MMRecConfig.load(tmp_path)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        MMRecConfig.load(tmp_path)
