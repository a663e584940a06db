"""Gray releases: ``routes`` (a route's picks and the canary analysis, pure) and ``rollout`` (routes at run time,
shadows, comparisons, automatic rollback)."""
