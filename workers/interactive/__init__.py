"""Tinker-compatible interactive training: a tenant drives a LoRA adapter on the shared resident
base call by call (forward_backward, optim_step, sample, save) instead of submitting a job.

`engine.InteractiveEngine` executes those calls in memory, every tenant's model an adapter on the
one base; `losses` reads Tinker's training datums and computes its built-in losses; `sampling`
decodes; `adapters` maps Tinker's LoRA settings to peft and writes and reads PEFT directories;
`runner` takes the calls from the database and feeds them to the engine. Requests and results
are Tinker's own JSON wire shapes, as plain dicts.
"""
