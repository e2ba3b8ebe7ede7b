"""hangup's benchmarks: overhead, scale, cancel and soak. See bench/README.md."""
