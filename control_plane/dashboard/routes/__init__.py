"""The dashboard's pages, one module per area: sign-in, jobs (table, job page, streams, a job's
priority, a sweep's moves), the new-job form, adapters, the platform (queue, workers, base
models), for a tenant's admins, its webhooks and their delivery logs, and, for the platform's
operators, the tenants."""
