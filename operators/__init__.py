"""The kopf operator: `FineTuningJob` (jobs as Kubernetes objects) and `AdapterSync` (serving
clusters that follow registry versions into vLLM).

The kopf handlers in `handlers` are short; what they do lives in plain functions
(`finetuningjob`, `adaptersync`) that take the API client, the Kubernetes reads and vLLM as
arguments, so that they can be tested without a cluster. The operator talks to loraforge through
`loraforge.client` only (an import-linter contract holds it).
"""
