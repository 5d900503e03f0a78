"""Pipeline stages: each a function with typed inputs (config + paths) and files as outputs.

The CLI (`trtpipe <stage>`) is a thin wrapper; dvc.yaml calls the CLI."""
