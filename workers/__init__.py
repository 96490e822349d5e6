"""Training: Ray trainer actors that claim jobs from the control plane's queue and train them.

Layers, top to bottom (import-linter holds them, see pyproject.toml): the Ray glue (`actor`,
`runner`, `distributed`), the job's line to the platform (`job_io`), the recipe and its parts
(`training`), and what the recipe stands on (`kernels`, `bases`). Imports `control_plane`,
never `loraforge`.
"""
