from __future__ import annotations

import pytest
import torch

from hicache_async import KVLayout, LayoutError

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "torch_dtype": "bfloat16",
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 7168,
    "num_attention_heads": 128,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "torch_dtype": "bfloat16",
}


def test_llama3_8b_bytes_by_hand() -> None:
    layout = KVLayout.from_hf_config(LLAMA3_8B, page_size=16)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (32, 8, 128)
    assert layout.dtype is torch.bfloat16
    # K and V, 8 heads of 128 bf16 values: 2 * 8 * 128 * 2 bytes per layer.
    assert layout.bytes_per_token_per_layer == 4096
    assert layout.bytes_per_token == 128 * 1024
    assert layout.bytes_per_page_per_layer == 4096 * 16
    assert layout.bytes_per_page == 2 * 1024 * 1024


def test_deepseek_v3_mla_bytes_by_hand() -> None:
    layout = KVLayout.from_hf_config(DEEPSEEK_V3, page_size=64)
    assert layout.use_mla
    assert (layout.num_kv_heads, layout.head_dim, layout.kv_planes) == (1, 576, 1)
    # One 576-wide latent vector per token and layer, bf16: 1152 bytes; 61 layers.
    assert layout.bytes_per_token_per_layer == 1152
    assert layout.bytes_per_token == 1152 * 61 == 70272
    assert layout.bytes_per_page == 70272 * 64


def test_dtype_by_name_alias_and_torch_object() -> None:
    base = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
    assert KVLayout(**base, dtype="torch.float16").dtype is torch.float16
    assert KVLayout(**base, dtype="bf16").dtype is torch.bfloat16
    fp8 = KVLayout(**base, dtype=torch.float8_e4m3fn, page_size=1)
    assert fp8.bytes_per_token_per_layer == 2 * 2 * 8 * 1
    assert fp8.model_dump(mode="json")["dtype"] == "float8_e4m3fn"


def test_layout_round_trips_through_json() -> None:
    layout = KVLayout.from_hf_config(DEEPSEEK_V3)
    again = KVLayout.model_validate_json(layout.model_dump_json())
    assert again == layout
    assert again.fingerprint == layout.fingerprint == "mla:bfloat16:L61:H1:D576:P16"


def test_fingerprint_differs_by_every_geometry_field() -> None:
    base = {"num_layers": 4, "num_kv_heads": 2, "head_dim": 8, "page_size": 4}
    prints = {KVLayout(**base).fingerprint}
    for change in (
        {"num_layers": 5},
        {"num_kv_heads": 1},
        {"head_dim": 16},
        {"page_size": 8},
        {"dtype": "float16"},
    ):
        prints.add(KVLayout(**{**base, **change}).fingerprint)
    assert len(prints) == 6


def test_mla_from_explicit_head_dim() -> None:
    layout = KVLayout(num_layers=3, head_dim=64, use_mla=True)
    assert (layout.num_kv_heads, layout.bytes_per_token) == (1, 3 * 64 * 2)


def test_multimodal_text_config() -> None:
    layout = KVLayout.from_hf_config({"text_config": LLAMA3_8B}, dtype="float16")
    assert layout.dtype is torch.float16
    assert layout.num_layers == 32


def test_head_dim_from_config_wins_over_hidden_size() -> None:
    cfg = {**LLAMA3_8B, "head_dim": 256}
    assert KVLayout.from_hf_config(cfg).head_dim == 256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_layers": 0, "num_kv_heads": 1, "head_dim": 8},
            "num_layers: Input should be greater than 0",
        ),
        (
            {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "dtype": "float64"},
            "unknown dtype 'float64'",
        ),
        (
            {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "dtype": torch.int64},
            "is not a KV cache dtype",
        ),
        ({"num_layers": 1, "head_dim": 8}, "num_kv_heads: Field required"),
        (
            {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "kv_lora_rank": 4},
            "set use_mla=True",
        ),
        (
            {"num_layers": 1, "num_kv_heads": 4, "head_dim": 8, "use_mla": True},
            "num_kv_heads must be 1",
        ),
        (
            {"num_layers": 1, "use_mla": True, "kv_lora_rank": 512},
            "both kv_lora_rank and qk_rope_head_dim",
        ),
        (
            {
                "num_layers": 1,
                "use_mla": True,
                "kv_lora_rank": 512,
                "qk_rope_head_dim": 64,
                "head_dim": 512,
            },
            "must equal kv_lora_rank + qk_rope_head_dim = 576",
        ),
        (
            {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "page_size": -16},
            "page_size: Input should be greater than 0",
        ),
        (
            {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "colour": "red"},
            "colour: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_layouts_are_layout_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LayoutError, match="invalid KVLayout") as info:
        KVLayout(**kwargs)
    assert message in str(info.value)


def test_layout_is_frozen() -> None:
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8)
    with pytest.raises(Exception, match="frozen"):
        layout.num_layers = 2  # type: ignore[misc]


def test_from_hf_config_missing_key() -> None:
    with pytest.raises(LayoutError, match="no 'num_hidden_layers'"):
        KVLayout.from_hf_config({"hidden_size": 8})
