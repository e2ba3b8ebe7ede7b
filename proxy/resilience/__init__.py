"""Pure resilience policy (no I/O): which target next and why, how a failed answer is
classified, Retry-After, and the per-upstream circuit breaker. The relay asks; it acts."""
