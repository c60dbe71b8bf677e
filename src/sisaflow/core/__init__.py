"""The foundation every other package stands on: the workspace's settings (`config`, `config_parse`), its paths
(`paths`), the error types (`errors`), atomic files and content hashes (`fsio`), DVC and git through public
functions (`versioning`), the deletion ledger (`ledger`) and the one-run-at-a-time lock (`lock`).

The ledger is here, not in `deletion`, because every layer must obey it: the import leaves its records out, the
ensemble refuses constituents trained on excluded records, and deletion writes it. Imports: the standard library
and third-party packages only; nothing else of sisaflow."""
