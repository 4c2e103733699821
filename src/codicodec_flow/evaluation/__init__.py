"""How good and how fast: quality metrics, the `eval` report, the `bench` timings, and PNG plots."""
