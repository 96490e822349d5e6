"""A fine-tuning job's `method`, in OpenAI's shape: supervised training, or DPO (Direct Preference
Optimization) on a file of preference pairs.

The body says `{"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, ...}}}` (or the
supervised equivalent); the job stores the type and DPO's beta among its `Hyperparameters`
(`method`, `dpo_beta`), where the trainer reads them, and answers `method` from them again.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from control_plane.hyperparameters import Hyperparameters

_DPO_EXAMPLE = 'method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}'
# What `method` sets, refused among the hyperparameters, with where it goes instead.
_SET_BY_METHOD = {
    "method": "the training method is method.type ('supervised' or 'dpo'), not a "
    f"hyperparameter: {_DPO_EXAMPLE} for DPO",
    "dpo_beta": f"DPO's beta is given as {_DPO_EXAMPLE}",
    "beta": f"beta is DPO's own hyperparameter, for a DPO job only: {_DPO_EXAMPLE}",
}


def refuse_set_by_method(
    value: dict[str, Any] | None, keys: tuple[str, ...] = tuple(_SET_BY_METHOD)
) -> dict[str, Any] | None:
    """A hyperparameters object, unless it names what only `method` may set."""
    for key in keys:
        if value and key in value:
            # the message as context: a template's braces would be read as placeholders
            raise PydanticCustomError("set_by_method", "{reason}", {"reason": _SET_BY_METHOD[key]})
    return value


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: dict[str, Any] | None = None

    @field_validator("hyperparameters")
    @classmethod
    def _not_set_by_method(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return refuse_set_by_method(value)


class DpoMethod(BaseModel):
    """DPO's hyperparameters: `beta` (how far the adapter may move from the base; "auto" or left
    out: 0.1) and the usual ones (`n_epochs`, `batch_size`, `learning_rate_multiplier`, ...)."""

    model_config = ConfigDict(extra="forbid")
    hyperparameters: dict[str, Any] | None = None

    @field_validator("hyperparameters")
    @classmethod
    def _beta(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        refuse_set_by_method(value, ("method", "dpo_beta"))
        beta = (value or {}).get("beta", "auto")
        if beta != "auto":
            try:
                Hyperparameters(dpo_beta=beta)  # the one place its bounds are written
            except ValidationError as exc:
                reason = f"beta: {exc.errors()[0]['msg']}"
                raise PydanticCustomError("invalid_beta", "{reason}", {"reason": reason}) from None
        return value


class Method(BaseModel):
    """`type` and at most the block of that type (`supervised` or `dpo`)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None

    @model_validator(mode="after")
    def _block_of_its_type(self) -> Method:
        if self.type == "supervised" and self.dpo is not None:
            reason = (
                "method.dpo is given but method.type is 'supervised': set type 'dpo' to train "
                "on preference pairs, or give the hyperparameters in method.supervised"
            )
        elif self.type == "dpo" and self.supervised is not None:
            reason = (
                "method.supervised is given but method.type is 'dpo': give a DPO job's "
                "hyperparameters in method.dpo.hyperparameters"
            )
        else:
            return self
        raise PydanticCustomError("method_mismatch", "{reason}", {"reason": reason})

    def own_hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters its block gives, named as `Hyperparameters` names them (DPO's
        `beta` is `dpo_beta`)."""
        if self.dpo is not None:
            given = dict(self.dpo.hyperparameters or {})
            if "beta" in given:
                given["dpo_beta"] = given.pop("beta")
            return given
        return dict(self.supervised.hyperparameters or {}) if self.supervised else {}


def method_public(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """A job's `method` as OpenAI's `FineTuningJob.method` has it: the type, and that type's
    block holding the job's hyperparameters (DPO's with its `beta`)."""
    kind = hyperparameters.get("method", "supervised")  # jobs made before DPO have none
    own = {k: v for k, v in hyperparameters.items() if k not in ("method", "dpo_beta")}
    if kind == "dpo":
        own = {"beta": hyperparameters.get("dpo_beta"), **own}
    return {"type": kind, kind: {"hyperparameters": own}}
