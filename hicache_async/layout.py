"""KV geometry: how many bytes a token, a page and a layer take, for MHA and MLA models.

Every tier sizes its buffers from one :class:`KVLayout`, and L3 pages carry its
:attr:`KVLayout.fingerprint` so that a page written for another model is never read back.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from typing import Annotated, Any, Self

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from hicache_async._validation import refuse_bool, translate
from hicache_async.errors import LayoutError

__all__ = ["KVLayout", "TorchDType", "dtype_name", "parse_dtype"]

# The dtypes a KV cache is stored in. Names follow ``torch`` (``torch.bfloat16`` -> "bfloat16").
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_ALIASES = {
    "fp32": "float32",
    "half": "float16",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


def parse_dtype(value: object) -> torch.dtype:
    """A ``torch.dtype`` from itself or its name ("bfloat16", "torch.bfloat16", "bf16")."""
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
        raise ValueError(f"dtype {value} is not a KV cache dtype; use one of {sorted(_DTYPES)}")
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        name = _ALIASES.get(name, name)
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(f"unknown dtype {value!r}; use one of {sorted(_DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a KV dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


TorchDType = Annotated[
    torch.dtype,
    BeforeValidator(parse_dtype),
    PlainSerializer(dtype_name, return_type=str),
    WithJsonSchema({"type": "string", "enum": sorted(_DTYPES)}),
]
"""A ``torch.dtype`` field that accepts names and serialises back to its name."""


class KVLayout(BaseModel):
    """The shape of one model's KV cache.

    MHA/GQA models store a key and a value vector per token, layer and KV head. MLA models
    (DeepSeek-V2/V3) store one latent vector per token and layer, ``kv_lora_rank +
    qk_rope_head_dim`` wide, with no separate K and V: there ``num_kv_heads`` is 1 and
    ``head_dim`` is the latent width (both derived when the two ranks are given).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    num_layers: int = Field(gt=0, description="Transformer layers that keep a KV cache.")
    num_kv_heads: int = Field(gt=0, description="KV heads per layer (after GQA); 1 for MLA.")
    head_dim: int = Field(gt=0, description="Width of one K or V head; the latent width for MLA.")
    dtype: TorchDType = Field(default=torch.bfloat16, description="Element type of the cache.")
    page_size: int = Field(default=16, gt=0, description="Tokens per page.")
    use_mla: bool = Field(default=False, description="One latent vector per token (MLA).")
    kv_lora_rank: int | None = Field(default=None, gt=0, description="MLA: compressed KV rank.")
    qk_rope_head_dim: int | None = Field(default=None, gt=0, description="MLA: RoPE part width.")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise translate(exc, "KVLayout", LayoutError) from exc

    @field_validator(
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "page_size",
        "kv_lora_rank",
        "qk_rope_head_dim",
        mode="before",
    )
    @classmethod
    def _no_bool_counts(cls, value: Any) -> Any:
        return refuse_bool(value)

    @model_validator(mode="before")
    @classmethod
    def _derive_mla_shape(cls, data: Any) -> Any:
        # MLA: one latent "head" per token, as wide as both ranks together; fill what is unset.
        if not isinstance(data, dict) or not data.get("use_mla"):
            return data
        data = dict(data)
        data.setdefault("num_kv_heads", 1)
        rank, rope = data.get("kv_lora_rank"), data.get("qk_rope_head_dim")
        if (rank is None) != (rope is None):
            raise ValueError("MLA needs both kv_lora_rank and qk_rope_head_dim, or neither")
        if "head_dim" not in data and rank is not None and rope is not None:
            with contextlib.suppress(TypeError, ValueError):  # the field validators report it
                data["head_dim"] = int(rank) + int(rope)
        return data

    @model_validator(mode="after")
    def _check_geometry(self) -> Self:
        rank, rope = self.kv_lora_rank, self.qk_rope_head_dim
        if not self.use_mla:
            if rank is not None or rope is not None:
                raise ValueError(
                    "kv_lora_rank and qk_rope_head_dim describe MLA models; set use_mla=True "
                    "or leave them unset"
                )
            return self
        if self.num_kv_heads != 1:
            raise ValueError(
                f"MLA stores one latent vector per token: num_kv_heads must be 1, "
                f"not {self.num_kv_heads}"
            )
        if rank is not None and rope is not None and self.head_dim != rank + rope:
            raise ValueError(
                f"MLA head_dim must equal kv_lora_rank + qk_rope_head_dim = {rank + rope}, "
                f"not {self.head_dim}"
            )
        return self

    @property
    def kv_planes(self) -> int:
        """2 for MHA (K and V), 1 for MLA (one latent)."""
        return 1 if self.use_mla else 2

    @property
    def itemsize(self) -> int:
        """Bytes of one element of :attr:`dtype`."""
        return self.dtype.itemsize

    @property
    def bytes_per_token_per_layer(self) -> int:
        """Bytes one token's K and V (or latent) take in one layer."""
        return self.kv_planes * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes across all layers."""
        return self.bytes_per_token_per_layer * self.num_layers

    @property
    def bytes_per_page_per_layer(self) -> int:
        """Bytes one page takes in one layer."""
        return self.bytes_per_token_per_layer * self.page_size

    @property
    def bytes_per_page(self) -> int:
        """Bytes one page takes across all layers: the unit L2 and L3 move."""
        return self.bytes_per_token * self.page_size

    @property
    def fingerprint(self) -> str:
        """A stable description of everything that decides a page's bytes.

        L3 pages store it so that a page written for another geometry is a miss.
        """
        kind = "mla" if self.use_mla else "mha"
        return (
            f"{kind}:{dtype_name(self.dtype)}:L{self.num_layers}:H{self.num_kv_heads}"
            f":D{self.head_dim}:P{self.page_size}"
        )

    @property
    def fingerprint_digest(self) -> str:
        """16 hex digits that name this geometry in L3 keys (stable across processes).

        A digest of :attr:`fingerprint` and, for MLA, of how the latent splits into
        ``kv_lora_rank`` and ``qk_rope_head_dim``: two layouts share it only when every field
        that decides a page's bytes is equal, so with ``HiCacheConfig.model_name`` it keeps
        another model's (or another dtype's) pages out of this cache's L3 namespace.
        """
        text = self.fingerprint
        if self.use_mla:
            text += f":R{self.kv_lora_rank}:Q{self.qk_rope_head_dim}"
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    @classmethod
    def from_hf_config(
        cls,
        config: Mapping[str, Any],
        *,
        page_size: int = 16,
        dtype: torch.dtype | str | None = None,
    ) -> KVLayout:
        """The layout of a Hugging Face ``config.json`` (Llama-style or DeepSeek-style MLA).

        ``dtype`` overrides the config's ``torch_dtype``; multimodal configs are read from
        their ``text_config``.
        """
        if "text_config" in config and isinstance(config["text_config"], Mapping):
            config = config["text_config"]

        def need(key: str) -> Any:
            if key not in config:
                raise LayoutError(f"the model config has no {key!r}; is it a decoder config?")
            return config[key]

        chosen = dtype if dtype is not None else config.get("torch_dtype") or config.get("dtype")
        common: dict[str, Any] = {
            "num_layers": need("num_hidden_layers"),
            "page_size": page_size,
            "dtype": chosen if chosen is not None else "bfloat16",
        }
        if config.get("kv_lora_rank"):
            return cls(
                **common,
                use_mla=True,
                kv_lora_rank=config["kv_lora_rank"],
                qk_rope_head_dim=need("qk_rope_head_dim"),
            )
        heads = need("num_attention_heads")
        head_dim = config.get("head_dim") or need("hidden_size") // heads
        return cls(
            **common,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
        )
