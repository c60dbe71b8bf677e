"""The Prefect flows: when the library's steps run, and with what retries. Each step of `pipeline.steps.STEPS`
becomes a Prefect task here; no ML logic and no decisions live in this package. Imports: `pipeline` (and
Prefect); only the CLI imports it."""
