"""The dashboard's pages, one module per area: sign-in, jobs (table, job page, streams, a job's
priority, a sweep's moves), the new-job form, adapters, the platform (queue, workers, base
models) and, for the platform's operators, the tenants."""
