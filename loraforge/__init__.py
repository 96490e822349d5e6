"""loraforge: fine-tune LLMs with LoRA on a shared frozen base; versioned adapters with lineage.

`from loraforge import Client` is the HTTP SDK (httpx only: what serving clusters and the
operator need; `PlatformAdmin` wraps it for the platform operators' calls). The rest of this package is the composition root that wires the control plane
and the workers together: the `loraforge` CLI (`loraforge.cli`), the embedded platform
(`loraforge.embedded`), the celery app and its tasks (`loraforge.tasks`) and the demo
(`loraforge.demo`). It is the only package that imports both `control_plane` and `workers`.
"""

from loraforge.client import ChecksumError, Client, LoraforgeError, TargetNotEmptyError
from loraforge.platform_admin import PlatformAdmin

__all__ = ["ChecksumError", "Client", "LoraforgeError", "PlatformAdmin", "TargetNotEmptyError"]
