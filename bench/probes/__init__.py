"""Small diagnostic probes kept beside the benchmark; see README.md in this folder."""
