"""Settings from `THROTTLLEM_*` environment variables, validated once at start-up.

Every setting has a default that works on the twin; a bad value stops the program with the
variable's name and what it accepts. Command-line flags override these per invocation.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.catalog import GPUS, MODELS

ENV_PREFIX = "THROTTLLEM_"


class ConfigError(ValueError):
    """An environment variable with a value we cannot use."""


class Settings(BaseSettings):
    """What the twin and (later) the sidecar run with."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    gpu: str = Field("a100-sxm4-80gb", description="GPU type (catalog name) of the twin")
    model: str = Field("llama3-8b", description="served model (catalog name)")
    tp: int = Field(1, ge=1, le=8, description="tensor-parallel degree of the engine")
    policy: str = Field("max", description="clock policy: max | static:<MHz>")
    seed: int = Field(0, ge=0, description="seed for every random choice of a run")
    models_dir: Path = Field(Path("models"), description="trained models: <gpu>/<model>-tp<N>/, lengths/")
    clock_change_delay_ms: float = Field(
        5.0, ge=0.0, le=1000.0, description="delay before a clock change takes effect (twin GPU)"
    )

    @field_validator("gpu", "model")
    @classmethod
    def _in_catalog(cls, value: str, info: ValidationInfo) -> str:
        known = GPUS if info.field_name == "gpu" else MODELS
        if value not in known:
            raise ValueError(f"must be one of {', '.join(sorted(known))}")
        return value


def load_settings() -> Settings:
    """Read and validate the environment; errors name the variable and what it accepts."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{ENV_PREFIX}{field.upper()}={err.get('input')!r}: {message}")
        raise ConfigError("; ".join(problems)) from None
