"""The New-job form's hyperparameters: only what differs from the defaults is requested (a
continued job inherits the rest from its parent, as over the API)."""

from __future__ import annotations

from control_plane.dashboard.routes.new_job import requested_hyperparameters
from control_plane.hyperparameters import Hyperparameters


def test_values_left_at_their_defaults_are_not_requested() -> None:
    defaults = Hyperparameters().model_dump(mode="json")
    form = {name: str(value) for name, value in defaults.items() if not isinstance(value, bool)}
    assert requested_hyperparameters(form) == {}
    assert requested_hyperparameters({}) == {}


def test_changed_values_checkboxes_and_module_lists_are_requested_as_the_api_takes_them() -> None:
    requested = requested_hyperparameters(
        {
            "n_epochs": "5",
            "lora_alpha": "32",
            "use_rslora": "on",
            "target_modules": "q_proj, v_proj",
            "learning_rate_multiplier": " ",
        }
    )
    assert requested == {
        "n_epochs": "5",
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj"],
    }
    hp = Hyperparameters(**requested)
    assert hp.n_epochs == 5 and hp.use_rslora and hp.target_modules == ["q_proj", "v_proj"]
