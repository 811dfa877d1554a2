"""Entry points for local runs and Ray jobs, and the command line."""
