"""Shared building blocks of the API models: the camelCase base model, number-as-string types, conditions."""

from __future__ import annotations

import datetime
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "charlora.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes validates patterns with RE2 (no look-ahead), Python with re: both accept these.
POSITIVE_NUMBER_PATTERN = r"^([0-9]*[1-9][0-9]*(\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)([eE][-+]?[0-9]+)?$"
NON_NEGATIVE_NUMBER_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"
VERSION_NAME_PATTERN = r"^v[1-9][0-9]*$"
PLACEHOLDER = "<tune>"


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are an error, as the apiserver prunes them."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict as it appears in a manifest (aliases, no unset Nones)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(ApiModel):
    """Status is written by the operator only; tolerate fields a newer operator may have added."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


def _rule(rule: str, message: str) -> dict[str, Any]:
    return {"rule": rule, "message": message}


def cel_rules(*rules: tuple[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL validations (rule, message) that the apiserver enforces."""
    return {"x-kubernetes-validations": [_rule(rule, message) for rule, message in rules]}


def find_placeholders(value: Any, path: str = "spec") -> list[str]:
    """Paths (camelCase, as in the manifest) of every string that still holds the ``<tune>`` placeholder."""
    if isinstance(value, str):
        return [path] if PLACEHOLDER in value else []
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in find_placeholders(item, f"{path}.{key}")]
    if isinstance(value, list | tuple):
        return [found for index, item in enumerate(value) for found in find_placeholders(item, f"{path}[{index}]")]
    return []


def _pattern_string(pattern: str, message: str, *, max_length: int) -> Any:
    """A string type checked against ``pattern`` by pydantic and, with the same message, by the apiserver (CEL)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(f"{message}; got {value!r}")
        return value

    return Annotated[
        str,
        AfterValidator(check),
        Field(max_length=max_length, json_schema_extra=cel_rules((f"self.matches(r'{pattern}')", message))),
    ]


if TYPE_CHECKING:  # plain strings to the type checker; validated strings at run time
    PositiveNumber = str
    NonNegativeNumber = str
    VersionName = str
else:
    PositiveNumber = _pattern_string(
        POSITIVE_NUMBER_PATTERN, 'must be a positive number written as a string, e.g. "1e-4"', max_length=32
    )
    """A positive decimal number kept as a string (``"1e-4"``): the API never holds floats."""
    NonNegativeNumber = _pattern_string(
        NON_NEGATIVE_NUMBER_PATTERN, 'must be a number >= 0 written as a string, e.g. "0.05"', max_length=32
    )
    """A decimal number >= 0 kept as a string (``"0.05"``)."""
    VersionName = _pattern_string(VERSION_NAME_PATTERN, "must be a version name like v1, v2, ...", max_length=16)


class Condition(StatusModel):
    """A metav1.Condition: the observed state of one aspect of the object."""

    type: str = Field(description="Type of condition in CamelCase, e.g. Trained or Ready.", max_length=316)
    status: Literal["True", "False", "Unknown"] = Field(description="Status of the condition: True, False or Unknown.")
    reason: str = Field(description="Machine-readable reason for the last transition, in CamelCase.", max_length=1024)
    message: str = Field(default="", description="Human-readable details of the last transition.", max_length=32768)
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation the condition was computed from."
    )
    last_transition_time: datetime.datetime = Field(
        description="When the condition last changed from one status to another (RFC 3339)."
    )
