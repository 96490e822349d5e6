"""The dashboard's pages, one module per area: sign-in, jobs (table, job page, streams, a job's
priority, a sweep's moves), the new-job form, adapters, interactive sessions (their models,
calls and saved weights, published from the page), batches (their progress, files and
cancel), the platform (queue, workers, base models),
for a tenant's admins, its webhooks and their delivery logs, and, for the platform's operators,
the tenants and what each used in a month."""
