"""Base models: checkpoint inspection, GGUF import and the local verified cache (`checkpoints`),
registration from a directory, object store, hub or GGUF file (`registration`), and the embedded
default SmolLM2 (`smollm2`)."""
