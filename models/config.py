"""Model configuration: the fields of a Hugging Face ``hgrn_bit`` ``config.json`` that the
network uses (MODEL.md), with their derived quantities."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ModelConfig", "ConfigError"]


class ConfigError(ValueError):
    """A config.json that does not describe a model this project can run."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    use_lower_bound: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config field {name} must be a positive integer, not {value!r}")
        if isinstance(self.rms_norm_eps, bool) or not isinstance(self.rms_norm_eps, (int, float)) \
                or not (self.rms_norm_eps > 0):
            raise ConfigError(f"config field rms_norm_eps must be a positive number, not {self.rms_norm_eps!r}")

    @property
    def d(self) -> int:
        return self.hidden_size

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @staticmethod
    def default_intermediate_size(hidden_size: int, hidden_ratio: float = 4) -> int:
        """MODEL.md: ``I = 256 * ceil(int(d * hidden_ratio * 2/3) / 256)``."""
        return 256 * math.ceil(int(hidden_size * hidden_ratio * 2 / 3) / 256)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        def need(key):
            if key not in raw:
                raise ConfigError(f"config.json has no field {key!r}")
            return raw[key]

        model_type = raw.get("model_type", "hgrn_bit")
        if model_type != "hgrn_bit":
            raise ConfigError(f"config.json has model_type {model_type!r}; only 'hgrn_bit' is supported")
        for key, expected in (("num_heads", 1), ("expand_ratio", 1), ("use_short_conv", False)):
            value = raw.get(key, expected)
            if value is None:
                value = expected
            if value != expected:
                raise ConfigError(f"config.json has {key} = {value!r}; only {expected!r} is supported")
        d = need("hidden_size")
        inter = raw.get("intermediate_size")
        if inter is None:
            ratio = raw.get("hidden_ratio") or 4
            if isinstance(d, bool) or not isinstance(d, int):
                raise ConfigError(f"config field hidden_size must be a positive integer, not {d!r}")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise ConfigError(f"config field hidden_ratio must be a number, not {ratio!r}")
            inter = cls.default_intermediate_size(d, ratio)
        use_lower_bound = raw.get("use_lower_bound", True)
        if not isinstance(use_lower_bound, bool):
            raise ConfigError(f"config field use_lower_bound must be true or false, not {use_lower_bound!r}")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=d,
            num_hidden_layers=need("num_hidden_layers"),
            intermediate_size=inter,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            use_lower_bound=use_lower_bound,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_dict(raw)

    def to_hf_dict(self) -> dict:
        """config.json contents in the reference implementation's form."""
        out = asdict(self)
        out.update(model_type="hgrn_bit", architectures=["HGRNBitForCausalLM"], num_heads=1,
                   expand_ratio=1, use_short_conv=False, hidden_ratio=4, hidden_act="swish",
                   attn_mode="fused_recurrent", tie_word_embeddings=False)
        return out

    def ternary_weights_per_layer(self) -> int:
        return 4 * self.d * self.d + 3 * self.d * self.intermediate_size

    def ternary_weights(self) -> int:
        """All ternary weights, LM head included: each is used once per token."""
        return self.n_layers * self.ternary_weights_per_layer() + self.vocab_size * self.d
