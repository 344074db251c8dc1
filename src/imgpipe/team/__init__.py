"""The team set-up: one MLflow server for everyone, on a database with proxied artifacts in
S3-compatible storage; the DVC remote beside it; and a local stack of all three to try it.

- ``server``: the team MLflow server's settings and running it (``imgpipe stack server``);
- ``checks``: what is checked before a server starts or data moves (database, bucket,
  DVC remote: ``imgpipe remote check``);
- ``stack``: the local stack's processes (``imgpipe stack up|down|env``).
"""
