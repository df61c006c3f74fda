"""Pipeline parallelism (filled in below)."""
