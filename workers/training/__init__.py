"""The LoRA training recipe (`recipe.train_adapter`, one entry point for 1..N ranks) and the parts
it composes: the device and precision, the resident base, the adapter, the data, the optimizer,
checkpoints and ranks; plus dataset formatting and the lineage of a published adapter."""
