"""The dashboard's pages, one module per area: sign-in, jobs (table, job page, streams), the
new-job form, adapters, and the platform (queue, workers, base models)."""
