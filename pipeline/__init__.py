"""Ray Data pipeline: Directer over sharded Parquet."""
